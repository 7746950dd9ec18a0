"""Step manifests: the versioned, canonical JSON that commits a step at a tier.

A manifest lists every rank's shard (key, size, per-chunk crc32c, tensors at offsets, the typed
tree of non-tensor values). It is written last and atomically; a step without a manifest does not
exist at that tier. Encoding is canonical (sorted keys, no spaces, ASCII, no NaN) so the same
step always yields the same bytes. ``from_json`` validates everything it reads: a manifest on disk
or in a bucket is input like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from ckptd.layout import TensorEntry, chunk_count, parse_tree, validate_tensors
from ckptd.types import shard_key, validate_job, validate_rank, validate_step

SCHEMA_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
MAX_MANIFEST_BYTES: Final = 512 * 1024 * 1024


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

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", shard_key(self.rank))

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "key": self.key,
            "nbytes": self.nbytes,
            "chunk_bytes": self.chunk_bytes,
            "chunk_crc32c": list(self.chunk_crc32c),
            "tensors": [t.to_json() for t in self.tensors],
            "tree": self.tree,
        }


@dataclass(frozen=True)
class Manifest:
    """The commit record of one step at one tier."""

    job: str
    step: int
    world_size: int
    shards: tuple[ShardEntry, ...]
    created_unix_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def shard(self, rank: int) -> ShardEntry:
        for s in self.shards:
            if s.rank == rank:
                return s
        raise KeyError(rank)

    def to_obj(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "job": self.job,
            "step": self.step,
            "world_size": self.world_size,
            "created_unix_s": round(self.created_unix_s, 6),
            "nbytes": self.nbytes,
            "shards": [s.to_json() for s in sorted(self.shards, key=lambda s: s.rank)],
            "extra": self.extra,
        }

    def to_json(self) -> bytes:
        return canonical_json(self.to_obj())

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse and validate; raise ValueError saying what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError("manifest too large")
        try:
            obj = json.loads(data)
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
        except (KeyError, TypeError) as exc:
            raise ValueError(f"manifest field missing or of the wrong type: {exc}") from None
        if not isinstance(extra, dict):
            raise ValueError("manifest 'extra' must be an object")
        ranks = sorted(s.rank for s in shards)
        if ranks != list(range(world_size)):
            raise ValueError(f"manifest lists ranks {ranks[:8]}... for world_size {world_size}")
        for s in shards:
            validate_rank(s.rank, world_size)
        return cls(job, step, world_size, shards, created, extra)


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
    return ShardEntry(rank, nbytes, chunk_bytes, crcs, tensors, tree, key)


def canonical_json(obj: Any) -> bytes:
    """Canonical encoding: sorted keys, compact, ASCII, NaN/inf refused."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()
