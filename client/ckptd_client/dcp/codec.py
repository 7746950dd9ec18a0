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

Invariants: ``decode`` validates every field it reads (through ``ckptd_client.dcp_record.parse``,
the torch-free half that ``ckptctl export`` uses too); a record of a newer schema version raises
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

from ckptd_client.dcp_record import SCHEMA, VERSION, DcpMetadataCorrupt, DcpSchemaTooNew, bad, parse

__all__ = ["DcpMetadataCorrupt", "DcpSchemaTooNew", "ShardRef", "decode", "encode"]


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


def decode(text: str | bytes) -> Metadata:
    rec = parse(text)  # validation and the typed errors: ckptd_client.dcp_record
    sdm: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, k in rec.keys.items():
        if k.kind == "bytes":
            sdm[fqn] = BytesStorageMetadata()
            continue
        dtype = getattr(torch, k.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise bad(f"key {fqn!r} has unknown dtype {k.dtype!r}")
        chunks = [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in k.chunks]
        sdm[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=dtype, requires_grad=k.requires_grad),
                                         size=torch.Size(k.size), chunks=chunks)
    storage_data = {MetadataIndex(s.fqn, None if s.offset is None else list(s.offset), s.index): ShardRef(s.rank, s.key)
                    for s in rec.storage}
    sm = rec.storage_meta
    storage_meta = None if sm is None else StorageMeta(checkpoint_id=sm["checkpoint_id"], save_id=sm["save_id"],
                                                       load_id=sm["load_id"], modules=sm["modules"])
    return Metadata(state_dict_metadata=sdm, planner_data=rec.planner_data, storage_data=storage_data,
                    storage_meta=storage_meta, version=rec.dcp_version)
