"""Step manifests: the versioned, canonical JSON that commits a step at a tier.

A manifest lists every rank's shard (key, size, per-chunk crc32c, tensors at offsets, the typed
tree of non-tensor values). It is written last and atomically; a step without a manifest does not
exist at that tier. Encoding is canonical (sorted keys, no spaces, ASCII, no NaN) so the same
step always yields the same bytes. ``from_json`` validates everything it reads: a manifest on disk
or in a bucket is input like any other.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ckptd.core.layout import TensorEntry, chunk_count, parse_tree, validate_tensors
from ckptd.core.types import (
    MAX_WORLD_SIZE,
    shard_key,
    validate_job,
    validate_node_id,
    validate_node_ranks,
    validate_rank,
    validate_step,
)

SCHEMA_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
MAX_MANIFEST_BYTES: Final = 512 * 1024 * 1024
#: Codecs of a stored chunk (``ChunkRef.codec``): the bytes as they are, zstandard, or zstandard over
#: the byte planes of 2- or 4-byte elements (every element's byte 0, then every byte 1, ...).
CODECS: Final = ("raw", "zstd", "zstd-shuf2", "zstd-shuf4")


@dataclass(frozen=True)
class ChunkRef:
    """Where one chunk of a shard is stored in the object tier, and how.

    ``object_key`` may belong to an older step of the same job (deduplication: the chunk's content
    was already stored); ``sha256`` is of the uncompressed bytes, ``stored_bytes`` the object's
    size. The chunk's crc32c stays in ``ShardEntry.chunk_crc32c``, over the uncompressed bytes."""

    object_key: str
    codec: str
    stored_bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.object_key, "codec": self.codec, "stored_bytes": self.stored_bytes,
                "sha256": self.sha256}


_TENSORS_JSON_MAX: Final = 8
_tensors_json: OrderedDict[int, tuple[tuple[TensorEntry, ...], list[dict[str, Any]]]] = OrderedDict()
_tensors_json_lock = threading.Lock()


def tensors_json(tensors: tuple[TensorEntry, ...]) -> list[dict[str, Any]]:
    """The JSON form of a shard's tensors, built once per tensor tuple: a job's saves share one
    tuple per layout (core/layout_memo.py) and every save writes its sidecar twice and its
    manifest once, 10^5 entries each for a large model. The list is shared: read it, never
    change it. Keyed by identity; the tuple is held, so its id is not reused while cached."""
    if not isinstance(tensors, tuple):
        return [t.to_json() for t in tensors]
    with _tensors_json_lock:
        got = _tensors_json.get(id(tensors))
        if got is not None and got[0] is tensors:
            return got[1]
    out = [t.to_json() for t in tensors]
    with _tensors_json_lock:
        _tensors_json[id(tensors)] = (tensors, out)
        while len(_tensors_json) > _TENSORS_JSON_MAX:
            _tensors_json.popitem(last=False)
    return out


@dataclass(frozen=True)
class ShardEntry:
    """One rank's shard as recorded in a manifest."""

    rank: int
    nbytes: int
    chunk_bytes: int
    chunk_crc32c: tuple[int, ...]
    tensors: tuple[TensorEntry, ...]
    tree: Any
    key: str = ""
    #: Full object-store key of the shard (object tier only; empty elsewhere). Optional in the
    #: JSON: written only when set, so manifests without it keep their exact bytes.
    object_key: str = ""
    #: Object tier only: one stored object per chunk (compressed, possibly shared with an older
    #: step). Empty: the shard is one object (``object_key``), as every step before codecs was.
    chunks: tuple[ChunkRef, ...] = ()

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", shard_key(self.rank))

    def to_json(self) -> dict[str, Any]:
        out = {
            "rank": self.rank,
            "key": self.key,
            "nbytes": self.nbytes,
            "chunk_bytes": self.chunk_bytes,
            "chunk_crc32c": list(self.chunk_crc32c),
            "tensors": tensors_json(self.tensors),
            "tree": self.tree,
        }
        if self.object_key:
            out["object_key"] = self.object_key
        if self.chunks:
            out["chunks"] = [c.to_json() for c in self.chunks]
        return out

    @property
    def stored_bytes(self) -> int:
        """Bytes this shard's manifest entry points at in the store (its logical size when unchunked)."""
        return sum(c.stored_bytes for c in self.chunks) if self.chunks else self.nbytes


@dataclass(frozen=True)
class Manifest:
    """The commit record of one step at one tier."""

    job: str
    step: int
    world_size: int
    shards: tuple[ShardEntry, ...]
    created_unix_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: A node's part of a multi-node step (its local disk holds only its ranks); empty: every rank.
    node_ranks: tuple[int, ...] = ()

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.node_ranks or tuple(range(self.world_size))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def shard(self, rank: int) -> ShardEntry:
        for s in self.shards:
            if s.rank == rank:
                return s
        raise KeyError(rank)

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "job": self.job,
            "step": self.step,
            "world_size": self.world_size,
            "created_unix_s": round(self.created_unix_s, 6),
            "nbytes": self.nbytes,
            "shards": [s.to_json() for s in sorted(self.shards, key=lambda s: s.rank)],
            "extra": self.extra,
        }
        if self.node_ranks:
            obj["node_ranks"] = list(self.node_ranks)
        return obj

    def to_json(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse and validate; raise ValueError saying what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError("manifest too large")
        try:
            obj = json.loads(data, parse_float=_finite_float, parse_constant=_no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_obj(obj)

    @classmethod
    def from_obj(cls, obj: Any) -> Manifest:
        if not isinstance(obj, dict):
            raise ValueError("manifest must be a JSON object")
        version = obj.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported manifest schema_version {version!r}")
        try:
            job = validate_job(obj["job"])
            step = validate_step(obj["step"])
            world_size = _int(obj["world_size"], "world_size")
            shards = tuple(_shard_from_obj(s) for s in obj["shards"])
            created = float(obj.get("created_unix_s", 0.0))
            extra = obj.get("extra", {})
        except (KeyError, TypeError, OverflowError) as exc:
            raise ValueError(f"manifest field missing or of the wrong type: {exc}") from None
        if not math.isfinite(created):
            raise ValueError(f"manifest created_unix_s {created} is not a finite number")
        if not isinstance(extra, dict):
            raise ValueError("manifest 'extra' must be an object")
        if not 1 <= world_size <= MAX_WORLD_SIZE:
            raise ValueError(f"manifest world_size {world_size} out of range [1, {MAX_WORLD_SIZE}]")
        node_ranks_raw = obj.get("node_ranks", [])
        if not isinstance(node_ranks_raw, list):
            raise ValueError("manifest node_ranks must be a list")
        node_ranks = tuple(_int(r, "node_ranks") for r in node_ranks_raw)
        if node_ranks and (list(node_ranks) != sorted(set(node_ranks))
                           or not 0 <= node_ranks[0] <= node_ranks[-1] < world_size):
            raise ValueError(f"manifest node_ranks must be sorted unique ranks < world_size {world_size}")
        ranks = sorted(s.rank for s in shards)
        if ranks != list(node_ranks or range(world_size)):
            raise ValueError(f"manifest lists ranks {ranks[:8]}... for world_size {world_size}")
        for s in shards:
            validate_rank(s.rank, world_size)
        return cls(job, step, world_size, shards, created, extra, node_ranks)


def _finite_float(text: str) -> float:
    """json.loads hook: canonical manifests never hold NaN or infinities, so a reader refuses them."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"manifest holds the non-finite number {text!r}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"manifest holds {name}, which canonical JSON never writes")


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer")
    return v


def _shard_from_obj(obj: Any) -> ShardEntry:
    if not isinstance(obj, dict):
        raise ValueError("shard entry must be an object")
    rank = _int(obj["rank"], "rank")
    nbytes = _int(obj["nbytes"], "nbytes")
    chunk_bytes = _int(obj["chunk_bytes"], "chunk_bytes")
    if nbytes < 0 or chunk_bytes <= 0:
        raise ValueError(f"shard {rank}: bad nbytes/chunk_bytes")
    crcs = tuple(_int(c, "chunk_crc32c") for c in obj["chunk_crc32c"])
    if len(crcs) != chunk_count(nbytes, chunk_bytes) or any(not 0 <= c < 2**32 for c in crcs):
        raise ValueError(f"shard {rank}: chunk_crc32c does not cover {nbytes} bytes")
    tensors = tuple(
        TensorEntry(
            name=str(t["name"]),
            dtype=str(t["dtype"]),
            shape=tuple(_int(d, "shape") for d in t["shape"]),
            offset=_int(t["offset"], "offset"),
            nbytes=_int(t["nbytes"], "nbytes"),
        )
        for t in obj["tensors"]
    )
    validate_tensors(list(tensors), nbytes)
    tree = obj["tree"]
    parse_tree(json.dumps(tree), len(tensors))
    key = str(obj.get("key", shard_key(rank)))
    if key != shard_key(rank):
        raise ValueError(f"shard {rank}: unexpected key {key!r}")
    object_key = obj.get("object_key", "")
    if not isinstance(object_key, str) or (object_key and not _valid_object_key(object_key, key)):
        raise ValueError(f"shard {rank}: invalid object_key {object_key!r}")
    chunks = _chunks_from_obj(obj.get("chunks", []), rank, nbytes, chunk_bytes)
    return ShardEntry(rank, nbytes, chunk_bytes, crcs, tensors, tree, key, object_key, chunks)


_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")


def _chunks_from_obj(raw: Any, rank: int, nbytes: int, chunk_bytes: int) -> tuple[ChunkRef, ...]:
    """The chunk records of a shard: none (one object), or one per chunk with a known codec, a
    raw size equal to the chunk's, an allow-listed key and a sha256 digest."""
    if not isinstance(raw, list):
        raise ValueError(f"shard {rank}: chunks must be a list")
    if not raw:
        return ()
    if len(raw) != chunk_count(nbytes, chunk_bytes):
        raise ValueError(f"shard {rank}: {len(raw)} chunk records for {chunk_count(nbytes, chunk_bytes)} chunks")
    out = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise ValueError(f"shard {rank}: chunk record {i} must be an object")
        key, codec, digest = c.get("key"), c.get("codec"), c.get("sha256")
        if not (isinstance(key, str) and isinstance(codec, str) and isinstance(digest, str)):
            raise ValueError(f"shard {rank}: chunk record {i}: key, codec and sha256 must be strings")
        ref = ChunkRef(key, codec, _int(c.get("stored_bytes"), "stored_bytes"), digest)
        length = min(chunk_bytes, nbytes - i * chunk_bytes)
        if (ref.codec not in CODECS or not 0 <= ref.stored_bytes <= 2 * length + 4096
                or (ref.codec == "raw" and ref.stored_bytes != length)):
            raise ValueError(f"shard {rank}: chunk {i}: bad codec {ref.codec!r} or size {ref.stored_bytes}")
        if not _SHA256_RE.fullmatch(ref.sha256):
            raise ValueError(f"shard {rank}: chunk {i}: bad sha256")
        if (len(ref.object_key) > 1024 or ".." in ref.object_key
                or _OBJECT_KEY_RE.fullmatch(ref.object_key) is None):
            raise ValueError(f"shard {rank}: chunk {i}: invalid key {ref.object_key!r}")
        out.append(ref)
    return tuple(out)


_OBJECT_KEY_RE: Final = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def _valid_object_key(object_key: str, key: str) -> bool:
    """'/'-separated allow-listed names, no '..', ending in the shard's own key; the object tier
    further checks that it lies inside its own prefix before using it."""
    return (len(object_key) <= 1024 and ".." not in object_key and object_key.endswith("/" + key)
            and _OBJECT_KEY_RE.fullmatch(object_key) is not None)


def canonical_json(obj: Any) -> bytes:
    """Canonical encoding: sorted keys, compact, ASCII, NaN/inf refused."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


@dataclass(frozen=True)
class ReplicaHeader:
    """Identity and layout of one shard, enough for the receiver to keep and restore it."""

    job: str
    step: int
    world_size: int
    entry: ShardEntry
    source_node: str
    node_ranks: tuple[int, ...] = ()
    created_unix_s: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.entry.rank

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.job, self.step, self.entry.rank)

    def validate(self) -> ReplicaHeader:
        """Raise ValueError naming the first inconsistency; return self."""
        validate_job(self.job)
        validate_step(self.step)
        validate_rank(self.entry.rank, self.world_size)
        validate_node_ranks(self.node_ranks, self.world_size, self.entry.rank)
        validate_node_id(self.source_node, "source node")
        e = self.entry
        if e.nbytes < 0 or e.chunk_bytes <= 0 or len(e.chunk_crc32c) != chunk_count(e.nbytes, e.chunk_bytes):
            raise ValueError(f"shard {e.rank}: chunk_crc32c does not cover {e.nbytes} bytes "
                             f"in chunks of {e.chunk_bytes}")
        return self

    def same_bytes(self, other: ReplicaHeader) -> bool:
        """Do both headers describe the same shard bytes (same size and checksums)?"""
        a, b = self.entry, other.entry
        return (self.key, a.nbytes, a.chunk_bytes, a.chunk_crc32c) == (
            other.key, b.nbytes, b.chunk_bytes, b.chunk_crc32c)
