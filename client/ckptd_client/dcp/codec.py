"""Versioned JSON codec of DCP's ``Metadata`` (never pickle): the record stored with each step.

The record is self-describing: for every key its kind (tensor or bytes), a tensor's global shape,
dtype and the offsets and sizes of every saved chunk, and where each chunk lies (``storage_data``:
the rank whose shard holds it and the tensor's name inside that shard). A reader that merges
shards into full tensors (an export, a consolidation) needs nothing else. Layout::

    {"schema": "ckptd.dcp.metadata", "version": 1,
     "keys": {fqn: {"kind": "tensor", "dtype": "float32", "size": [..], "requires_grad": false,
                    "chunks": [{"offsets": [..], "sizes": [..]}, ..]} | {"kind": "bytes"}},
     "storage": [{"fqn": .., "offset": [..] | null, "index": int | null, "rank": r, "key": name}, ..],
     "planner_data": {fqn: [path components, str or int]} | null,
     "storage_meta": {"checkpoint_id": str | null, "save_id": .., "load_id": .., "modules": [..]} | null,
     "dcp_version": str | null}

Invariants: ``decode`` validates every field it reads; a record of a newer schema version raises
``DcpSchemaTooNew`` and a malformed one ``DcpMetadataCorrupt``, both naming what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ckptd.core.errors import FailedPrecondition, IntegrityError
from ckptd.core.types import DTYPE_ITEMSIZE

SCHEMA = "ckptd.dcp.metadata"
VERSION = 1


class DcpMetadataCorrupt(IntegrityError):
    """The step's DCP metadata record is malformed (damaged, or not written by ckptd)."""


class DcpSchemaTooNew(FailedPrecondition):
    """The step's DCP metadata was written by a newer ckptd schema than this client reads."""


@dataclass(frozen=True)
class ShardRef:
    """Where one saved chunk lies: in ``rank``'s shard of the step, under tensor name ``key``."""

    rank: int
    key: str


def encode(md: Metadata) -> str:
    keys: dict[str, Any] = {}
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            keys[fqn] = {"kind": "tensor", "dtype": str(meta.properties.dtype).removeprefix("torch."),
                         "size": list(meta.size), "requires_grad": bool(meta.properties.requires_grad),
                         "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in meta.chunks]}
        else:
            keys[fqn] = {"kind": "bytes"}
    storage = []
    for idx, ref in (md.storage_data or {}).items():
        if not isinstance(ref, ShardRef):
            raise TypeError(f"storage_data of {idx.fqn} is {type(ref).__name__}, not a ckptd ShardRef")
        storage.append({"fqn": idx.fqn, "offset": None if idx.offset is None else list(idx.offset),
                        "index": idx.index, "rank": ref.rank, "key": ref.key})
    planner = None if md.planner_data is None else {k: list(v) for k, v in md.planner_data.items()}
    sm = md.storage_meta
    storage_meta = None if sm is None else {
        "checkpoint_id": None if sm.checkpoint_id is None else str(sm.checkpoint_id),
        "save_id": sm.save_id, "load_id": sm.load_id, "modules": list(sm.modules)}
    return json.dumps({"schema": SCHEMA, "version": VERSION, "keys": keys, "storage": storage,
                       "planner_data": planner, "storage_meta": storage_meta,
                       "dcp_version": md.version}, separators=(",", ":"), sort_keys=True)


def _bad(what: str) -> DcpMetadataCorrupt:
    return DcpMetadataCorrupt(f"DCP metadata record: {what}")


def _ints(v: Any, what: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise _bad(f"{what} is not a list of non-negative integers")
    return list(v)


def _opt_str(v: Any, what: str) -> str | None:
    if v is not None and not isinstance(v, str):
        raise _bad(f"{what} is not a string")
    return v


def decode(text: str | bytes) -> Metadata:
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise _bad(f"schema is not {SCHEMA!r}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(f"version {version!r} is not a positive integer")
    if version > VERSION:
        raise DcpSchemaTooNew(f"DCP metadata has schema version {version}; this client reads up to "
                              f"{VERSION}: upgrade ckptd_client to load it")
    keys, storage = doc.get("keys"), doc.get("storage")
    if not isinstance(keys, dict) or not isinstance(storage, list):
        raise _bad("'keys' must be an object and 'storage' a list")
    sdm: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, k in keys.items():
        sdm[fqn] = _key(fqn, k)
    storage_data: dict[MetadataIndex, ShardRef] = {}
    for i, s in enumerate(storage):
        if not isinstance(s, dict) or not isinstance(s.get("fqn"), str) or s["fqn"] not in sdm:
            raise _bad(f"storage entry {i} names no known key")
        rank, key, index = s.get("rank"), s.get("key"), s.get("index")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 or not isinstance(key, str):
            raise _bad(f"storage entry {i} ({s['fqn']}) has no valid rank and key")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
            raise _bad(f"storage entry {i} ({s['fqn']}) has a bad index")
        offset = None if s.get("offset") is None else _ints(s["offset"], f"storage entry {i} offset")
        storage_data[MetadataIndex(s["fqn"], offset, index)] = ShardRef(rank, key)
    return Metadata(state_dict_metadata=sdm, planner_data=_planner(doc.get("planner_data")),
                    storage_data=storage_data, storage_meta=_storage_meta(doc.get("storage_meta")),
                    version=_opt_str(doc.get("dcp_version"), "dcp_version"))


def _key(fqn: str, k: Any) -> TensorStorageMetadata | BytesStorageMetadata:
    if not isinstance(k, dict) or k.get("kind") not in ("tensor", "bytes"):
        raise _bad(f"key {fqn!r} has no kind 'tensor' or 'bytes'")
    if k["kind"] == "bytes":
        return BytesStorageMetadata()
    dtype = k.get("dtype")
    if dtype not in DTYPE_ITEMSIZE or not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise _bad(f"key {fqn!r} has unknown dtype {dtype!r}")
    size = _ints(k.get("size"), f"key {fqn!r} size")
    chunks = k.get("chunks")
    if not isinstance(chunks, list):
        raise _bad(f"key {fqn!r} has no chunk list")
    out = []
    for j, c in enumerate(chunks):
        if not isinstance(c, dict):
            raise _bad(f"key {fqn!r} chunk {j} is not an object")
        offsets = _ints(c.get("offsets"), f"{fqn!r} chunk {j} offsets")
        sizes = _ints(c.get("sizes"), f"{fqn!r} chunk {j} sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + n > d for o, n, d in zip(offsets, sizes, size)):
            raise _bad(f"key {fqn!r} chunk {j} lies outside the tensor's size {size}")
        out.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
    if not isinstance(k.get("requires_grad", False), bool):
        raise _bad(f"key {fqn!r} requires_grad is not a bool")
    props = TensorProperties(dtype=getattr(torch, dtype), requires_grad=k.get("requires_grad", False))
    return TensorStorageMetadata(properties=props, size=torch.Size(size), chunks=out)


def _planner(v: Any) -> dict[str, tuple[str | int, ...]] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _bad("planner_data is not an object")
    out: dict[str, tuple[str | int, ...]] = {}
    for fqn, path in v.items():
        if not isinstance(path, list) or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
            raise _bad(f"planner_data of {fqn!r} is not a list of strings and integers")
        out[fqn] = tuple(path)
    return out


def _storage_meta(v: Any) -> StorageMeta | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _bad("storage_meta is not an object")
    modules = v.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise _bad("storage_meta.modules is not a list of strings")
    return StorageMeta(checkpoint_id=_opt_str(v.get("checkpoint_id"), "checkpoint_id"),
                       save_id=_opt_str(v.get("save_id"), "save_id"),
                       load_id=_opt_str(v.get("load_id"), "load_id"), modules=modules)
