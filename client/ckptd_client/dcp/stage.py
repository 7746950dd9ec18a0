"""Staging for ``dcp.async_save`` straight into a ckptd slot: one copy while training waits.

``CkptdStorageWriter`` is an ``AsyncStager``: ``async_save`` calls its ``stage`` instead of
DCP's default stager, which would copy the state to CPU buffers and leave the writer to copy it
again into the daemon's slot. ``stage`` leases the rank's slot for the step (BeginSave), copies
every local tensor into it at 64-byte aligned offsets (a DTensor's local shard; its placement
and global shape stay on the staged DTensor), and returns a state dict of views into the slot.
Training may modify its tensors as soon as ``stage`` returns.

Planning then runs in the background on the staged state. Each chunk DCP's planner gives this
rank is found in the slot by its key (``StagedSlot.entries``), the chunks the planner gave to
another rank (a replicated tensor is written once) are dropped by packing the kept ones down
(``pack``: memmove inside the slot), the non-tensor values DCP serialized are appended after
them, and the shard is committed with its packed size (CommitShard accepts at most the leased
size). Nothing here holds the mapping across processes: a ``StagedSlot`` is plain data, so the
process checkpointer's process maps the same slot and commits the same lease.

Invariants: a chunk that is not where the stage put it (other shape or dtype), or values that do
not fit the room reserved for them, make the writer abort the lease and save the ordinary way;
the lease is committed or aborted exactly once.
"""

from __future__ import annotations

import copy
import ctypes
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.tensor import DTensor

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.layout import TensorEntry, align_up
from ckptd.core.types import DTYPE_ITEMSIZE
from ckptd_client.manager_base import ManagerBase
from ckptd_client.tree import Leaf, copy_into, view_of

#: room reserved after the tensors for the non-tensor values DCP serializes (torch.save each)
VALUE_ROOM_BYTES = 64 * 1024
VALUE_ROOM_PER_VALUE_BYTES = 8 * 1024


@dataclass
class StagedSlot:
    """A leased slot holding one rank's staged tensors (plain data: it crosses processes)."""

    lease_id: str
    slot_path: str
    capacity_bytes: int
    leased_bytes: int
    chunk_bytes: int
    entries: dict[str, TensorEntry] = field(default_factory=dict)  # fqn -> where its local tensor is


def stage_into_slot(manager: ManagerBase, step: int, state_dict: dict[str, Any]) -> tuple[StagedSlot, Any]:
    """Copy state_dict's tensors into a leased slot; return the lease and the staged state dict."""
    flat, mappings = flatten_state_dict(state_dict)
    leaves: list[Leaf] = []
    entries: list[TensorEntry] = []
    offset, n_values = 0, 0
    for fqn, value in flat.items():
        if isinstance(value, torch.Tensor):
            local = value.to_local() if isinstance(value, DTensor) else value
            dtype = str(local.dtype).removeprefix("torch.")
            if dtype not in DTYPE_ITEMSIZE or local.device.type == "meta":
                raise TypeError(f"{fqn}: dtype {dtype} on {local.device} cannot be staged into a slot")
            offset = align_up(offset)
            nbytes = local.numel() * local.element_size()
            leaves.append(Leaf(fqn, local, "t", dtype, tuple(local.shape), nbytes))
            entries.append(TensorEntry(fqn, dtype, tuple(local.shape), offset, nbytes))
            offset += nbytes
        else:
            n_values += 1
    leased = align_up(offset) + VALUE_ROOM_BYTES + n_values * VALUE_ROOM_PER_VALUE_BYTES
    m = manager
    begin = m.conn.call(m.conn.stub.BeginSave, pb.BeginSaveRequest(
        job=m.job, step=step, rank=m.rank, world_size=m.world_size, nbytes=leased, client_pid=os.getpid(),
        node_ranks=list(m.node_ranks), incarnation=m.incarnation, resumed=m.resumed_from is not None,
        resumed_from=-1 if m.resumed_from is None else m.resumed_from, new_world_size=m.allow_new_world_size,
    ), timeout_s=(m.wait_timeout_s or 0) + 120)
    staged = StagedSlot(begin.lease_id, begin.slot_path, begin.slot_capacity_bytes, leased, begin.chunk_bytes,
                        {e.name: e for e in entries})
    try:
        mm = m._maps.get(begin.slot_path, begin.slot_capacity_bytes)
        copy_into(mm, leaves, entries, m._maps.base(begin.slot_path))
        out: dict[str, Any] = {}
        for fqn, value in flat.items():
            e = staged.entries.get(fqn)
            if e is None:
                out[fqn] = copy.deepcopy(value)
                continue
            view = view_of(mm, "t", e)
            if isinstance(value, DTensor):
                view = DTensor.from_local(view, value.device_mesh, value.placements, run_check=False,
                                          shape=value.shape, stride=value.stride())
            out[fqn] = view
    except BaseException:
        abort(manager, staged)
        raise
    return staged, unflatten_state_dict(out, mappings)


def abort(manager: ManagerBase, staged: StagedSlot) -> None:
    manager.conn.call(manager.conn.stub.AbortSave, pb.AbortSaveRequest(lease_id=staged.lease_id))


def pack(manager: ManagerBase, staged: StagedSlot, kept: list[tuple[str, str]],
         values: list[tuple[str, bytes]]) -> tuple[list[TensorEntry], dict[str, int], int] | None:
    """Pack the kept chunks ((fqn, key) pairs) down in the slot, append the serialized values;
    return (layout entries named by key, key -> entry index, packed nbytes), or None if the
    values do not fit the leased room."""
    mm = manager._maps.get(staged.slot_path, staged.capacity_bytes)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    out: list[TensorEntry] = []
    index: dict[str, int] = {}
    cursor = 0
    for fqn, key in sorted(kept, key=lambda fk: staged.entries[fk[0]].offset):
        e = staged.entries[fqn]
        dst = align_up(cursor)
        if dst != e.offset and e.nbytes:
            ctypes.memmove(base + dst, base + e.offset, e.nbytes)  # dst < offset: safe when overlapping
        index[key] = len(out)
        out.append(TensorEntry(f"dcp.{key}", e.dtype, e.shape, dst, e.nbytes))
        cursor = dst + e.nbytes
    for key, raw in values:
        dst = align_up(cursor)
        if dst + len(raw) > staged.leased_bytes:
            return None
        mm[dst:dst + len(raw)] = raw
        index[key] = len(out)
        out.append(TensorEntry(f"dcp.{key}", "uint8", (len(raw),), dst, len(raw)))
        cursor = dst + len(raw)
    return out, index, cursor
