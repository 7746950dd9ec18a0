"""``CkptdStorageWriter``: torch.distributed.checkpoint (DCP) saves through ckptd.

One argument changes: ``dcp.save(state, storage_writer=CkptdStorageWriter(job, step))`` (and
``dcp.async_save`` with the thread or the process checkpointer). DCP's planner decides which rank
writes which chunk (``DefaultSavePlanner`` writes a replicated tensor once, on one rank); each
rank's chunks are then saved as one ordinary ckptd shard through ``CheckpointManager.save``
(shared-memory slot, checksums, tiers, replication, retention, ``ckptctl``: all as a native save).
The coordinator's shard is saved last, in ``finish``, and carries the step's DCP metadata as
versioned JSON (``codec.py``), so the step commits only once every chunk and the metadata are in.

Invariants: a chunk is named in the metadata by ``ShardRef(rank, key)``, ``key`` the tensor's
name inside that rank's shard; a save that fails raises (DCP then fails the checkpoint) instead
of logging. The writer pickles to its configuration only (the process checkpointer sends it to
another process), where it opens its own connection (``managers.py``).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import BudgetExhausted
from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import TensorEntry, layout_to_pb
from ckptd.core.types import Level, validate_step
from ckptd_client.dcp.codec import ShardRef, encode
from ckptd_client.dcp.managers import LazyManager, ManagerConfig
from ckptd_client.dcp.stage import StagedSlot, abort, pack, stage_into_slot
from ckptd_client.handles import SaveHandle
from ckptd_client.manager_base import ManagerBase
from ckptd_client.ranks import default_rank

#: the names inside a DCP step's shards
DATA_KEY, METADATA_KEY = "dcp", "dcp_metadata"


def chunk_key(index: MetadataIndex) -> str:
    """The tensor name of one saved chunk inside its rank's shard."""
    return index.fqn if index.offset is None else f"{index.fqn}@{','.join(map(str, index.offset))}"


class CkptdStorageWriter(LazyManager, StorageWriter):
    """A DCP ``StorageWriter`` that saves each rank's chunks as its ckptd shard of ``step``."""

    def __init__(self, job: str | None = None, step: int | None = None, *, addr: str | os.PathLike[str] | None = None,
                 rank: int | None = None, world_size: int | None = None, allow_new_world_size: bool = False,
                 wait_level: Level | None = Level.STAGED, manager: ManagerBase | None = None) -> None:
        super().__init__()
        if manager is not None:
            self.config = ManagerConfig.of(manager)
        elif job is None:
            raise ValueError("CkptdStorageWriter needs a job name or a manager")
        else:  # resolved here: the process checkpointer's process may not see the trainer's group
            r, w = default_rank()
            self.config = ManagerConfig(job, None if addr is None else str(addr), r if rank is None else rank,
                                        w if world_size is None else world_size, allow_new_world_size)
        self._manager = manager
        self.step = None if step is None else validate_step(step)
        #: the coordinator's finish waits until the whole step reaches it: STAGED (the default) means
        #: committed in memory, so a load right after the save finds it; None returns at once
        self.wait_level = wait_level
        self.is_coordinator = False
        self._chunks: dict[str, Any] = {}
        self.handle: SaveHandle | None = None
        self._staged: StagedSlot | None = None  # the slot async_save staged into (stage.py)
        self._superseded: StagedSlot | None = None  # a staged slot the ordinary path copies from first
        self._packed: tuple[list[TensorEntry], dict[str, int], int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_manager"] = None  # a connection does not cross processes: the other side opens its own
        state["_chunks"] = {}
        state["handle"] = None
        return state

    # -- StorageWriter ------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            step = validate_step(int(str(checkpoint_id)))
            if self._staged is not None and step != self.step:
                staged, self._staged = self._staged, None
                abort(self.manager, staged)
                raise ValueError(f"async_save staged step {self.step} but names checkpoint_id {step}: "
                                 "give the step to CkptdStorageWriter(step=...) alone")
            self.step = step
        self._chunks, self.handle = {}, None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return str(checkpoint_id).isdigit()

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=None if self.step is None else str(self.step))

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.step is None:
            raise ValueError("CkptdStorageWriter: no step (pass step= or checkpoint_id=)")
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    # -- AsyncStager (dcp.async_save stages through the writer: stage.py) -----------------------
    _synchronize_after_execute = False

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def synchronize_staging(self) -> None:
        """Staging is synchronous: nothing to wait for."""

    def close(self) -> None:
        """The slot mappings belong to the manager."""

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copy the state into this rank's slot for the step; return views of it (stage.py)."""
        if self.step is None:
            raise ValueError("CkptdStorageWriter: no step (pass step=)")
        self._staged, staged = stage_into_slot(self.manager, self.step, state_dict)
        return dict(staged)

    # -- writing ----------------------------------------------------------------------------------
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if self._staged is not None:
            results = self._write_staged(plan, planner)
            if results is not None:
                fut: Future[list[WriteResult]] = Future()
                fut.set_result(results)
                return fut
        rank = self.manager.rank
        chunks: dict[str, Any] = {}
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            key = chunk_key(item.index)
            if item.type == WriteItemType.BYTE_IO:
                raw = _raw_bytes(data)
                chunks[key] = np.frombuffer(raw, dtype=np.uint8)
                size = len(raw)
            else:
                assert isinstance(data, torch.Tensor)
                tensor = data.detach()
                if hasattr(tensor, "to_local"):  # a DTensor: its local chunk is what this rank holds
                    tensor = tensor.to_local()
                chunks[key] = tensor
                size = tensor.numel() * tensor.element_size()
            results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=ShardRef(rank, key)))
        if self._superseded is not None:  # the chunks are views of the staged slot: copied out first,
            superseded, self._superseded = self._superseded, None  # then its lease (this step's) goes
            chunks = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in chunks.items()}
            abort(self.manager, superseded)
        if self.is_coordinator:
            self._chunks = chunks  # saved in finish, with the metadata
        else:
            self._save({DATA_KEY: chunks})
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for per_rank in results for r in per_rank}
        if self._packed is not None:
            self._commit_staged(encode(metadata))
        else:
            self._save({DATA_KEY: self._chunks, METADATA_KEY: encode(metadata)})
        self._chunks = {}

    def _write_staged(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult] | None:
        """The chunks are in the slot already: pack the ones this rank writes, commit (the
        coordinator in finish). None (lease aborted) when a chunk is not where it was staged."""
        staged = self._staged
        assert staged is not None
        rank = self.manager.rank
        kept: list[tuple[str, str]] = []
        values: list[tuple[str, bytes]] = []
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            key = chunk_key(item.index)
            if item.type == WriteItemType.BYTE_IO:
                raw = _raw_bytes(data)
                values.append((key, raw))
                size = len(raw)
            else:
                assert isinstance(data, torch.Tensor)
                local = data.to_local() if hasattr(data, "to_local") else data
                e = staged.entries.get(item.index.fqn)
                if e is None or tuple(local.shape) != e.shape or str(local.dtype).removeprefix("torch.") != e.dtype:
                    kept = []
                    break
                kept.append((item.index.fqn, key))
                size = e.nbytes
            results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=ShardRef(rank, key)))
        packed = pack(self.manager, staged, kept, values) if kept or not plan.items or values else None
        if packed is None or len(results) != len(plan.items):
            # the ordinary path copies the chunks out of this slot before its lease is aborted
            # (write_data), so the slot cannot be reused under them
            self._staged, self._superseded = None, staged
            return None
        self._packed = packed
        if not self.is_coordinator:
            self._commit_staged(None)
        return results

    def _commit_staged(self, metadata_json: str | None) -> None:
        staged, packed = self._staged, self._packed
        assert staged is not None and packed is not None and self.step is not None
        tensors, index, nbytes = packed
        tree: list[Any] = [[DATA_KEY, {"d": [[key, {"t": i}] for key, i in index.items()]}]]
        if metadata_json is not None:
            tree.append([METADATA_KEY, {"v": metadata_json}])
        m = self.manager
        mm = m._maps.get(staged.slot_path, staged.capacity_bytes)
        crcs = chunk_crcs(memoryview(mm)[:nbytes], staged.chunk_bytes) if m.checksum == "client" else []
        m.conn.call(m.conn.stub.CommitShard, pb.CommitShardRequest(
            lease_id=staged.lease_id, job=m.job, step=self.step, rank=m.rank, world_size=m.world_size,
            nbytes=nbytes, layout=layout_to_pb(tensors, json.dumps({"d": tree}, separators=(",", ":"))),
            chunk_bytes=staged.chunk_bytes, chunk_crc32c=crcs))
        self._staged = self._packed = None
        self.handle = SaveHandle(m, self.step, nbytes=nbytes)
        m.handles.append(self.handle)
        if self.wait_level is not None and metadata_json is not None:
            self.handle.wait(self.wait_level)

    # -------------------------------------------------------------------------------------------
    def _save(self, state: dict[str, Any]) -> None:
        assert self.step is not None
        with torch.no_grad():
            handle = self.manager.save(self.step, state)
        self.handle = handle
        if handle.error is not None:
            raise handle.error
        if handle.skipped:
            raise BudgetExhausted(f"DCP save of step {self.step} was skipped (no slot free in the budget)")
        if self.wait_level is not None and METADATA_KEY in state:  # the coordinator, last to save
            handle.wait(self.wait_level)


def _raw_bytes(data: Any) -> bytes:
    """A BYTE_IO write item's bytes (DCP hands a BytesIO, or a bytes-like object)."""
    return data.getvalue() if isinstance(data, io.BytesIO) else bytes(data)
