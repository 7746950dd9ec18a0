"""The client's part of one save after BeginSave: copy the planned state into the slot, commit it.

``ShardSaver`` owns a manager's save-side state: the per-shape plans (``SavePlanner`` over the
manager's ``LayoutMemo``), the slot mappings (``SlotMaps``; a slot's cached views are dropped
before its mapping is closed) and the background ``SlotWarmer`` that maps this rank's spare slots
ahead of need, and the ``SavePreparer`` that has them made and mapped before the first save
(``prepare``). ``plan(state)`` flattens and lays out the state (``tree.HoldsDTensor`` for a state
DCP must plan, TypeError for unsupported values); ``fill_and_commit(begin, step, plan, ...)``
copies it into the leased slot, optionally computes the client-side checksums, and commits the
shard; a state holding CUDA tensors gets its slot page-locked first (pinned.py). The collector is
paused across both on the training thread (gcpause.py). The manager builds the BeginSave request
(it holds the writer's incarnation and options) and owns the error policy.

Invariants: a lease handed to ``fill_and_commit`` is committed, or aborted (AbortSave) when the
copy or the checksums fail, before the call returns or raises; a save that had to map a new slot
kicks the warmer, so the slot's spares are mapped before later saves need them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout_memo import LayoutMemo
from ckptd_client import gcpause
from ckptd_client.rpc import Connection
from ckptd_client.save.pinned import PinnedSlots, holds_cuda
from ckptd_client.save.prep import SavePreparation, SavePreparer
from ckptd_client.save.save_plan import SavePlan, SavePlanner
from ckptd_client.save.slot_maps import SlotMaps
from ckptd_client.save.slot_warmer import SlotWarmer
from ckptd_client.tree import HoldsDTensor


class ShardSaver:
    """One rank's save path into the daemon's slots (module docstring)."""

    def __init__(self, conn: Connection, job: str, rank: int, world_size: int, layouts: LayoutMemo,
                 pinned: PinnedSlots | None = None) -> None:
        self.conn, self.job, self.rank, self.world_size = conn, job, rank, world_size
        self.plans = SavePlanner(layouts)
        self.pinned = pinned if pinned is not None else PinnedSlots()
        self.maps = SlotMaps(on_drop=self._drop)
        self.warmer = SlotWarmer(conn, job, rank, self.maps, on_mapped=self._warm_views)
        self.preparer = SavePreparer(conn, job, rank, world_size, self.maps, on_mapped=self._warm_views)

    def _warm_views(self, path: str) -> None:  # a slot mapped ahead: the copy views of the layout too
        self.plans.warm(path, self.maps.base(path))

    def prepare(self, state: Any, slots: int = 0) -> SavePreparation:
        """Plan state (its layout is reused by the next save) and have this rank's slots for it made,
        mapped and viewed in the background (save/prep.py); a state of DTensors: nothing to do."""
        try:
            plan = self.plan(state)
        except HoldsDTensor:  # DCP plans those at save time: nothing to size the slots by
            return SavePreparation.skipped("a state of DTensors is planned by DCP at save time")
        return self.preparer.start(plan.nbytes, slots)

    def plan(self, state: Any) -> SavePlan:
        """Flatten and lay out state; 10^5 tensors: no collector passes over the live state."""
        with gcpause.paused():
            return self.plans.plan(state)

    def fill_and_commit(self, begin: pb.BeginSaveResponse, step: int, plan: SavePlan,
                        client_checksum: bool, t0: float, after_copy: Callable[[], None] | None = None,
                        on_copied: Callable[[], None] | None = None) -> None:
        """Copy plan into begin's slot and commit the shard (AbortSave if the copy fails);
        ``t0``: when the save started (the stall the daemon records). ``after_copy`` (overlap.py)
        runs after the copy and may refuse the save by raising (the lease is aborted);
        ``on_copied`` runs once the bytes are in the slot, before the commit. With either, the
        call runs off the training thread: the collector is left alone."""
        mapped_before = self.maps.mapped_count
        background = after_copy is not None or on_copied is not None
        try:
            mm = self.maps.get(begin.slot_path, begin.slot_capacity_bytes)
            if self.pinned.usable()[0] and holds_cuda(plan.leaves):  # D2H by DMA (pinned.py)
                self.pinned.ensure(begin.slot_path, self.maps.base(begin.slot_path))
            with contextlib.nullcontext() if background else gcpause.paused():
                self.plans.copy(plan, begin.slot_path, mm, self.maps.base(begin.slot_path))
            if after_copy is not None:
                after_copy()
            crcs = chunk_crcs(memoryview(mm)[:plan.nbytes], begin.chunk_bytes) if client_checksum else []
        except BaseException:
            self.conn.call(self.conn.stub.AbortSave, pb.AbortSaveRequest(lease_id=begin.lease_id))
            raise
        if on_copied is not None:
            on_copied()
        self.conn.call(self.conn.stub.CommitShard, pb.CommitShardRequest(
            lease_id=begin.lease_id, job=self.job, step=step, rank=self.rank,
            world_size=self.world_size, nbytes=plan.nbytes, layout=self.plans.layout_pb(plan),
            chunk_bytes=begin.chunk_bytes, chunk_crc32c=crcs,
            client_stall_s=time.perf_counter() - t0,
        ))
        if self.maps.mapped_count != mapped_before:  # a new slot: its spares may follow
            self.warmer.kick(plan.nbytes)

    def _drop(self, slot_path: str) -> None:  # before a mapping is closed: views, then pinning
        self.plans.forget(slot_path)
        self.pinned.forget(slot_path)

    def close(self) -> None:
        self.preparer.close()
        self.warmer.close()
        self.maps.close()


__all__ = ["ShardSaver"]
