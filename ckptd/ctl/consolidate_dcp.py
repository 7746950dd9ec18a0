"""Consolidation of a step saved through the DCP plugin (``ckptd_client.dcp``): full tensors merged
from the chunks every rank saved, named as in the model's ``state_dict``.

Rank 0's shard carries DCP's metadata as versioned JSON (``dcp_metadata``, read torch-free by
``ckptd_client.dcp_record``): per key its dtype, global size and chunk boxes, and for each chunk
the rank whose shard holds it under the tensor name ``dcp.<key>``. ``dcp_tensors`` turns that
into one ``DcpTensor`` per model key (the top-level key of DCP's ``planner_data`` path picks the
model, the rest of the path is the name); ``DcpTensor.blocks`` yields the full tensor's bytes in
row-major order, reading only its own chunks through the verified ``ChunkReader`` of each rank.

Invariants: the chunks of a tensor tile it exactly (checked before any byte is read); a tensor
sharded along its first dimension only (FSDP, ``Shard(0)``) streams chunk by chunk; any other
tiling is assembled in one buffer of the tensor's size, which with its largest chunk must fit in
the memory limit (``InvalidArgument`` otherwise). A missing or damaged record, or a chunk the
record names that the shard lacks, raises ``DcpMetadataCorrupt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from ckptd_client.dcp_record import DcpMetadataCorrupt, KeyRecord, Record, parse

from ckptd.core.errors import InvalidArgument
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest
from ckptd.core.types import DTYPE_ITEMSIZE
from ckptd.ctl.consolidate import ChunkReader, choose_key, top_level

METADATA_KEY = "dcp_metadata"


@dataclass(frozen=True)
class DcpChunk:
    rank: int
    entry: TensorEntry  # the chunk's bytes inside that rank's shard
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class DcpTensor:
    """One full tensor of a DCP step: ``entry`` describes it (dtype, global shape, nbytes)."""

    entry: TensorEntry
    chunks: tuple[DcpChunk, ...]

    def slabs(self) -> bool:
        """Every chunk spans all dimensions but the first: its bytes are one range of the output."""
        return all(c.sizes[1:] == self.entry.shape[1:] for c in self.chunks)

    def assemble_bytes(self) -> int:
        """Bytes held at once beyond the readers' buffers."""
        if self.slabs():
            return 0
        return self.entry.nbytes + max((c.entry.nbytes for c in self.chunks), default=0)

    def blocks(self, reader: Callable[[int], ChunkReader]) -> Iterator[memoryview]:
        if self.slabs():
            for c in sorted(self.chunks, key=lambda c: c.offsets[:1]):
                yield from reader(c.rank).pieces(c.entry.offset, c.entry.nbytes)
            return
        item = DTYPE_ITEMSIZE[self.entry.dtype]
        shape = self.entry.shape
        out = np.zeros(shape[:-1] + (shape[-1] * item,), dtype=np.uint8)
        for c in self.chunks:
            data = bytearray()
            for piece in reader(c.rank).pieces(c.entry.offset, c.entry.nbytes):
                data += piece
            box = tuple(slice(o, o + n) for o, n in zip(c.offsets[:-1], c.sizes[:-1])) + (
                slice(c.offsets[-1] * item, (c.offsets[-1] + c.sizes[-1]) * item),)
            out[box] = np.frombuffer(bytes(data), dtype=np.uint8).reshape(c.sizes[:-1] + (c.sizes[-1] * item,))
        yield out.reshape(-1).data


def is_dcp(manifest: Manifest) -> bool:
    return 0 in manifest.ranks and METADATA_KEY in dict(top_level(manifest.shard(0).tree))


def record(manifest: Manifest) -> Record:
    node = dict(top_level(manifest.shard(0).tree)).get(METADATA_KEY)
    if not isinstance(node, dict) or not isinstance(node.get("v"), str):
        raise DcpMetadataCorrupt(f"{manifest.job}@{manifest.step}: rank 0's DCP metadata record is not a string")
    try:
        return parse(node["v"])
    except DcpMetadataCorrupt as exc:
        raise DcpMetadataCorrupt(f"{manifest.job}@{manifest.step}: {exc}") from None


def _path(rec: Record, fqn: str) -> tuple[str, str]:
    """(top-level key, name below it) of a DCP key."""
    path = (rec.planner_data or {}).get(fqn)
    if path and len(path) > 1:
        return str(path[0]), ".".join(map(str, path[1:]))
    top, _, rest = fqn.partition(".")
    return top, rest


def _check_tiling(fqn: str, k: KeyRecord) -> None:
    numel = math.prod(k.size)
    covered = sum(math.prod(c.sizes) for c in k.chunks)
    if covered != numel:
        raise DcpMetadataCorrupt(f"DCP key {fqn!r}: its chunks cover {covered} of {numel} elements")
    if len(k.chunks) > 1 and numel:
        seen = np.zeros(k.size, dtype=np.bool_)
        for c in k.chunks:
            box = tuple(slice(o, o + n) for o, n in zip(c.offsets, c.sizes))
            if seen[box].any():
                raise DcpMetadataCorrupt(f"DCP key {fqn!r}: chunk at {list(c.offsets)} overlaps another")
            seen[box] = True


def _chunk(manifest: Manifest, rec: Record, fqn: str, k: KeyRecord, offsets: tuple[int, ...],
           entries: dict[int, dict[str, TensorEntry]], where: dict[tuple[str, tuple[int, ...]], tuple[int, str]],
           sizes: tuple[int, ...]) -> DcpChunk:
    ref = where.get((fqn, offsets))
    if ref is None:
        raise DcpMetadataCorrupt(f"DCP key {fqn!r}: no storage entry for its chunk at {list(offsets)}")
    rank, key = ref
    if rank not in entries:
        raise DcpMetadataCorrupt(f"DCP key {fqn!r}: its chunk at {list(offsets)} lies on rank {rank}, "
                                 f"which {manifest.job}@{manifest.step} does not have")
    entry = entries[rank].get(f"dcp.{key}")
    want = math.prod(sizes) * DTYPE_ITEMSIZE[k.dtype]
    if entry is None or entry.nbytes != want or entry.dtype != k.dtype:
        raise DcpMetadataCorrupt(f"DCP key {fqn!r}: rank {rank}'s shard has no {k.dtype} chunk 'dcp.{key}' "
                                 f"of {want} bytes")
    return DcpChunk(rank, entry, offsets, sizes)


def dcp_tensors(manifest: Manifest, wanted: str | None) -> tuple[str, dict[str, DcpTensor]]:
    """(model key, name -> full tensor) of a DCP step, names in the record's order."""
    rec = record(manifest)
    tops = list(dict.fromkeys(_path(rec, fqn)[0] for fqn in rec.keys))
    model_key = choose_key(tops, wanted, f"{manifest.job}@{manifest.step}")
    entries = {s.rank: {t.name: t for t in s.tensors} for s in manifest.shards}
    where = {(s.fqn, s.offset or ()): (s.rank, s.key) for s in rec.storage}
    out: dict[str, DcpTensor] = {}
    for fqn, k in rec.keys.items():
        top, name = _path(rec, fqn)
        if top != model_key or k.kind != "tensor":
            continue
        _check_tiling(fqn, k)
        chunks = tuple(_chunk(manifest, rec, fqn, k, c.offsets, entries, where, c.sizes) for c in k.chunks)
        nbytes = math.prod(k.size) * DTYPE_ITEMSIZE[k.dtype]
        out[name] = DcpTensor(TensorEntry(name, k.dtype, k.size, 0, nbytes), chunks)
    if not out:
        raise InvalidArgument(f"{manifest.job}@{manifest.step}: {model_key!r} holds no tensors")
    return model_key, out


def dcp_state(rec: Record, model_key: str) -> dict[str, Any]:
    """The non-model keys of a DCP step as JSON: tensors described, DCP's opaque bytes named."""
    out: dict[str, Any] = {}
    for fqn, k in rec.keys.items():
        if _path(rec, fqn)[0] == model_key:
            continue
        out[fqn] = ({"tensor": {"dtype": k.dtype, "shape": list(k.size)}} if k.kind == "tensor"
                    else {"bytes": "a torch.save object inside DCP (not exported)"})
    return out
