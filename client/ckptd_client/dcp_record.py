"""The DCP metadata record as plain data (pure JSON, no torch): what ``dcp/codec.py`` turns into
DCP's ``Metadata`` and what ``ckptctl export`` reads to merge a DCP step's chunks into full tensors.

The layout is documented in ``ckptd_client/dcp/codec.py``. ``parse`` validates every field it
reads: a record of a newer schema version raises ``DcpSchemaTooNew``, a malformed one
``DcpMetadataCorrupt``, both naming what is wrong. This module lives outside ``ckptd_client.dcp``
(whose package imports torch) so that torch-free readers can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ckptd.core.errors import FailedPrecondition, IntegrityError
from ckptd.core.types import DTYPE_ITEMSIZE

SCHEMA = "ckptd.dcp.metadata"
VERSION = 1


class DcpMetadataCorrupt(IntegrityError):
    """The step's DCP metadata record is malformed (damaged, or not written by ckptd)."""


class DcpSchemaTooNew(FailedPrecondition):
    """The step's DCP metadata was written by a newer ckptd schema than this client reads."""


@dataclass(frozen=True)
class ChunkRecord:
    """One saved chunk of a tensor: its box inside the global tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class KeyRecord:
    """One key of the saved state: a tensor (dtype, global size, chunks) or opaque bytes."""

    kind: str  # "tensor" | "bytes"
    dtype: str = ""
    size: tuple[int, ...] = ()
    requires_grad: bool = False
    chunks: tuple[ChunkRecord, ...] = ()


@dataclass(frozen=True)
class StorageRecord:
    """Where one saved item lies: ``rank``'s shard, tensor name ``key`` (``dcp.`` prefixed there)."""

    fqn: str
    offset: tuple[int, ...] | None
    index: int | None
    rank: int
    key: str


@dataclass(frozen=True)
class Record:
    keys: dict[str, KeyRecord]
    storage: tuple[StorageRecord, ...]
    planner_data: dict[str, tuple[str | int, ...]] | None
    storage_meta: dict[str, Any] | None
    dcp_version: str | None


def bad(what: str) -> DcpMetadataCorrupt:
    return DcpMetadataCorrupt(f"DCP metadata record: {what}")


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise bad(f"{what} is not a list of non-negative integers")
    return tuple(v)


def opt_str(v: Any, what: str) -> str | None:
    if v is not None and not isinstance(v, str):
        raise bad(f"{what} is not a string")
    return v


def parse(text: str | bytes) -> Record:
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise bad(f"schema is not {SCHEMA!r}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"version {version!r} is not a positive integer")
    if version > VERSION:
        raise DcpSchemaTooNew(f"DCP metadata has schema version {version}; this client reads up to "
                              f"{VERSION}: upgrade ckptd_client to load it")
    keys, storage = doc.get("keys"), doc.get("storage")
    if not isinstance(keys, dict) or not isinstance(storage, list):
        raise bad("'keys' must be an object and 'storage' a list")
    recs = {fqn: _key(fqn, k) for fqn, k in keys.items()}
    refs = []
    for i, s in enumerate(storage):
        if not isinstance(s, dict) or not isinstance(s.get("fqn"), str) or s["fqn"] not in recs:
            raise bad(f"storage entry {i} names no known key")
        rank, key, index = s.get("rank"), s.get("key"), s.get("index")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 or not isinstance(key, str):
            raise bad(f"storage entry {i} ({s['fqn']}) has no valid rank and key")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
            raise bad(f"storage entry {i} ({s['fqn']}) has a bad index")
        offset = None if s.get("offset") is None else _ints(s["offset"], f"storage entry {i} offset")
        refs.append(StorageRecord(s["fqn"], offset, index, rank, key))
    return Record(recs, tuple(refs), _planner(doc.get("planner_data")), _storage_meta(doc.get("storage_meta")),
                  opt_str(doc.get("dcp_version"), "dcp_version"))


def _key(fqn: str, k: Any) -> KeyRecord:
    if not isinstance(k, dict) or k.get("kind") not in ("tensor", "bytes"):
        raise bad(f"key {fqn!r} has no kind 'tensor' or 'bytes'")
    if k["kind"] == "bytes":
        return KeyRecord("bytes")
    dtype = k.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise bad(f"key {fqn!r} has unknown dtype {dtype!r}")
    size = _ints(k.get("size"), f"key {fqn!r} size")
    chunks = k.get("chunks")
    if not isinstance(chunks, list):
        raise bad(f"key {fqn!r} has no chunk list")
    out = []
    for j, c in enumerate(chunks):
        if not isinstance(c, dict):
            raise bad(f"key {fqn!r} chunk {j} is not an object")
        offsets = _ints(c.get("offsets"), f"{fqn!r} chunk {j} offsets")
        sizes = _ints(c.get("sizes"), f"{fqn!r} chunk {j} sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + n > d for o, n, d in zip(offsets, sizes, size)):
            raise bad(f"key {fqn!r} chunk {j} lies outside the tensor's size {list(size)}")
        out.append(ChunkRecord(offsets, sizes))
    requires_grad = k.get("requires_grad", False)
    if not isinstance(requires_grad, bool):
        raise bad(f"key {fqn!r} requires_grad is not a bool")
    return KeyRecord("tensor", dtype, size, requires_grad, tuple(out))


def _planner(v: Any) -> dict[str, tuple[str | int, ...]] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("planner_data is not an object")
    out: dict[str, tuple[str | int, ...]] = {}
    for fqn, path in v.items():
        if not isinstance(path, list) or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
            raise bad(f"planner_data of {fqn!r} is not a list of strings and integers")
        out[fqn] = tuple(path)
    return out


def _storage_meta(v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad("storage_meta is not an object")
    modules = v.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise bad("storage_meta.modules is not a list of strings")
    return {"checkpoint_id": opt_str(v.get("checkpoint_id"), "checkpoint_id"),
            "save_id": opt_str(v.get("save_id"), "save_id"), "load_id": opt_str(v.get("load_id"), "load_id"),
            "modules": list(modules)}
