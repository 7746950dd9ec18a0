"""``CkptdStorageReader``: ``dcp.load(state, storage_reader=CkptdStorageReader(job))`` from ckptd.

``read_metadata`` takes the step's DCP metadata from the step's manifest (``GetManifest``: the
coordinator's shard tree carries it, ``codec.py``), so no shard byte is read to plan. DCP's
``DefaultLoadPlanner`` then reshards: each rank asks only for the chunks that overlap what it
holds now, whatever world size saved them. ``read_data`` groups the rank's read items by the saved
rank that holds them and reads each of those shards once through the daemon's streamed restore
(``restore.stream.read_streamed``, the nearest valid tier first: memory, disk, peer, object, every
chunk crc32c verified before a byte is handed out), copying from each saved chunk only the slice
the plan asks for. Saved shards no item needs are never read.

"Latest" is the newest committed step; with a process group spanning the job every rank takes
the oldest of the ranks' answers (so all ranks load the same step).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import FailedPrecondition, NotFound
from ckptd.core.integrity import covering_chunks
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest
from ckptd.core.types import validate_step
from ckptd_client.dcp.codec import DcpMetadataCorrupt, ShardRef, decode
from ckptd_client.dcp.managers import LazyManager, ManagerConfig
from ckptd_client.dcp.writer import DATA_KEY, METADATA_KEY
from ckptd_client.manager_base import ManagerBase
from ckptd_client.restore.stream import read_streamed
from ckptd_client.restore.strict import StateMismatchError, Strictness
from ckptd_client.tree import view_of


def _named(tree: dict[str, Any], key: str) -> dict[str, Any] | None:
    ((kind, val),) = tree.items()
    if kind != "d":
        return None
    for k, child in val:
        if k == key:
            return dict(child)
    return None


class CkptdStorageReader(LazyManager, StorageReader):
    """A DCP ``StorageReader`` over the DCP steps a ``CkptdStorageWriter`` saved."""

    def __init__(self, job: str | None = None, step: int | str = "latest", *,
                 addr: str | os.PathLike[str] | None = None, manager: ManagerBase | None = None,
                 strictness: Strictness | None = None) -> None:
        super().__init__()
        if manager is not None:
            self.config = ManagerConfig.of(manager)
        elif job is None:
            raise ValueError("CkptdStorageReader needs a job name or a manager")
        else:
            self.config = ManagerConfig(job, None if addr is None else str(addr), None, None)
        self._manager = manager
        #: strict (the default): a saved dtype other than the state's is an error before any copy
        self.strictness = strictness or Strictness()
        self.step: int | None = None if step == "latest" else validate_step(int(step))
        self.loaded_step: int | None = None  # the step read_metadata chose
        self.saved_world_size = 0
        self.metadata: Metadata | None = None
        #: tensor bytes this rank copied out of each saved rank's shard (the slices it needs), and the
        #: bytes of non-tensor values (every rank takes all of those)
        self.bytes_read: dict[int, int] = {}
        self.object_bytes_read = 0
        self.served_from: dict[int, str] = {}  # saved rank -> the tier its shard was read from
        #: per saved rank, the bytes of its shard the daemon was asked to read at most (the crc32c
        #: chunks covering this rank's slices; memory and disk read only those, docs/dcp.md)
        self.chunk_bytes_asked: dict[int, int] = {}
        self._manifest: Manifest | None = None

    # -- StorageReader --------------------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.step = validate_step(int(str(checkpoint_id)))
        self.bytes_read = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return str(checkpoint_id).isdigit()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        step = self.step if self.step is not None else self.newest_step()
        if step < 0:
            raise NotFound(f"no committed step of job {self.manager.job!r}")
        m = self.manager
        resp = m.conn.call(m.conn.stub.GetManifest, pb.GetManifestRequest(job=m.job, step=step))
        manifest = Manifest.from_json(resp.manifest_json.encode())
        if 0 not in manifest.ranks:
            raise FailedPrecondition(
                f"the manifest of {m.job}@{step} this node's daemon serves lists ranks {list(manifest.ranks)}, not "
                "rank 0, whose shard holds the DCP metadata: loading a multi-node DCP step from a node "
                "without rank 0 is not supported yet")
        node = _named(manifest.shard(0).tree, METADATA_KEY)
        if node is None or not isinstance(node.get("v"), str):
            raise DcpMetadataCorrupt(f"step {step} of {m.job!r} holds no DCP metadata record "
                                     "(not saved through CkptdStorageWriter?)")
        self.metadata = decode(node["v"])
        self.loaded_step, self.saved_world_size = step, manifest.world_size
        self._manifest = manifest
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.metadata is not None and self.loaded_step is not None
        per_rank: dict[int, list[ReadItem]] = {}
        self._check_dtypes(plan, planner)
        for item in plan.items:
            ref = self.metadata.storage_data.get(item.storage_index)
            if not isinstance(ref, ShardRef):
                raise DcpMetadataCorrupt(f"the DCP metadata of step {self.loaded_step} names no shard "
                                         f"for {item.storage_index.fqn}")
            per_rank.setdefault(ref.rank, []).append(item)
        for rank in sorted(per_rank):
            self._read_rank(rank, per_rank[rank], planner)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    # -------------------------------------------------------------------------------------------
    def newest_step(self) -> int:
        """The newest committed step (-1: none), agreed by every rank when a group spans the job."""
        steps = self.manager.all_steps()
        newest = steps[-1] if steps else -1
        dist = self.manager._job_group()
        if dist is not None:
            gathered: list[int | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, newest)
            newest = min(s for s in gathered if s is not None)
        return newest

    def _check_dtypes(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        """Strict: every tensor this rank loads has the saved dtype (or conversion was asked for)."""
        assert self.metadata is not None
        if not self.strictness.strict or self.strictness.convert_dtype:
            return
        bad: list[str] = []
        for item in plan.items:
            meta = self.metadata.state_dict_metadata.get(item.storage_index.fqn)
            if item.type == LoadItemType.TENSOR and isinstance(meta, TensorStorageMetadata):
                have = planner.resolve_tensor(item).dtype
                if have != meta.properties.dtype and item.storage_index.fqn not in bad:
                    bad.append(f"{item.storage_index.fqn} (saved {meta.properties.dtype}, state has {have})")
        if bad:
            raise StateMismatchError([], [], bad)

    def _read_rank(self, rank: int, items: list[ReadItem], planner: LoadPlanner) -> None:
        """Read rank's saved shard once, copying only the slices ``items`` ask for."""
        assert self.metadata is not None and self.loaded_step is not None
        m = self.manager
        request = pb.PrepareRestoreRequest(job=m.job, rank=rank, world_size=self.saved_world_size,
                                           step=self.loaded_step, client_pid=os.getpid(),
                                           ranges=self._ranges(rank, items))
        storage = self.metadata.storage_data

        def consume(buf: Any, tensors: list[TensorEntry], tree: dict[str, Any], wait: Any, verifier: Any) -> None:
            assert verifier is None  # this reader does not ask to check the slot itself
            data = _named(tree, DATA_KEY)
            if data is None:
                raise DcpMetadataCorrupt(f"rank {rank}'s shard of step {self.loaded_step} holds no DCP data")
            index = {k: v for k, v in data["d"]}
            copied = 0
            for item in items:
                ref = storage[item.storage_index]
                node = index.get(ref.key)
                if node is None:
                    raise DcpMetadataCorrupt(f"rank {rank}'s shard of step {self.loaded_step} lacks {ref.key!r}")
                ((kind, idx),) = node.items()
                entry = tensors[idx]
                wait(entry.offset + entry.nbytes)
                if item.type == LoadItemType.BYTE_IO:
                    self.object_bytes_read += self._copy(item, kind, buf, entry, planner)
                else:
                    copied += self._copy(item, kind, buf, entry, planner)
            self.bytes_read[rank] = copied

        _, done = read_streamed(m.conn, request, consume, timeout_s=600)
        self.served_from[rank] = done.served_from

    def _ranges(self, rank: int, items: list[ReadItem]) -> list[pb.ByteRange]:
        """The byte ranges of rank's saved shard that hold the slices ``items`` ask for (from the
        step's manifest; none, i.e. the whole shard, when this node's manifest lacks the rank)."""
        assert self.metadata is not None
        manifest = self._manifest
        if manifest is None or rank not in manifest.ranks:
            return []
        entry = manifest.shard(rank)
        data = _named(entry.tree, DATA_KEY)
        if data is None:
            return []
        index = {k: v for k, v in data["d"]}
        out: list[pb.ByteRange] = []
        for item in items:
            node = index.get(self.metadata.storage_data[item.storage_index].key)
            if node is None:
                return []  # read_data names the missing chunk
            ((_, idx),) = node.items()
            t = entry.tensors[idx]
            start, end = _slice_bytes(t, item) if item.type == LoadItemType.TENSOR else (0, t.nbytes)
            if end > start:
                out.append(pb.ByteRange(offset=t.offset + start, length=end - start))
        chunks = covering_chunks([(r.offset, r.length) for r in out], entry.chunk_bytes, entry.nbytes)
        self.chunk_bytes_asked[rank] = sum(min(entry.chunk_bytes, entry.nbytes - i * entry.chunk_bytes)
                                           for i in chunks)
        return out

    @staticmethod
    def _copy(item: ReadItem, kind: str, buf: Any, entry: TensorEntry, planner: LoadPlanner) -> int:
        if item.type == LoadItemType.BYTE_IO:
            raw = np.frombuffer(buf, dtype=np.uint8, count=entry.nbytes, offset=entry.offset).tobytes()
            planner.load_bytes(item, io.BytesIO(raw))
            return entry.nbytes
        src = view_of(buf, kind, entry)
        for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
            src = src.narrow(dim, start, length)
        target = planner.resolve_tensor(item).detach()
        if tuple(target.shape) != tuple(src.shape):
            raise DcpMetadataCorrupt(f"{item.storage_index.fqn}: saved slice {list(src.shape)} does not fit "
                                     f"the target {list(target.shape)}")
        with torch.no_grad():
            target.copy_(src)
        planner.commit_tensor(item, target)
        return int(src.numel() * src.element_size())



def _slice_bytes(t: TensorEntry, item: ReadItem) -> tuple[int, int]:
    """[start, end) in bytes, inside tensor t (row-major), of the slice item asks for: from its first
    element to its last (the rows between are read too when the slice is not contiguous)."""
    if any(n == 0 for n in item.lengths) or not t.nbytes:
        return 0, 0
    itemsize = t.nbytes // max(1, math.prod(t.shape))
    strides = [math.prod(t.shape[d + 1:]) for d in range(len(t.shape))]
    first = sum(o * st for o, st in zip(item.storage_offsets, strides))
    last = sum((o + n - 1) * st for o, n, st in zip(item.storage_offsets, item.lengths, strides))
    return first * itemsize, (last + 1) * itemsize
