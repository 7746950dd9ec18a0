"""The daemon's side of the peer protocols: replicas held for other nodes, and shards served.

``SlotReplicaStore`` implements the peer server's dependencies (ckptd/peers/types.py) over the
daemon's slot pool and catalog:
- ``begin_replica`` leases a slot under an owner of its own per (job, rank) (a replica never takes
  an own rank's slots) and the peer server streams the verified bytes into it; ``commit`` records a
  ``ReplicaRecord`` and writes the slot's sidecar (with ``replica_of``), so a replica in RAM
  survives a restart of this daemon; an aborted or torn replica never gets a sidecar.
- ``open_shard`` serves a replica or an own shard from its slot (held while it streams), or an
  own step committed on disk through a verified scratch slot.
- ``holdings`` lists what this node can serve, for restore planning on other nodes.
- with ``peers.store_on_disk`` each replica received is also written to this node's disk in the
  background (ckptd/peers/replica_disk.py, the slot held meanwhile), adopted again at start-up, and
  served from there once its slot is gone (a reboot, a wiped shm dir).
Only the newest replica of each (job, rank) is protected from slot reuse (catalog.slot_reusable).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from ckptd.core import failpoints
from ckptd.core.config import Config
from ckptd.core.errors import InvalidArgument, NotFound
from ckptd.core.manifest import ReplicaHeader
from ckptd.core.types import TierName
from ckptd.memory.catalog import Catalog, ReplicaRecord, TierState, sidecar_meta
from ckptd.memory.slots import Slot, SlotPool
from ckptd.peers.replica_disk import DiskReplicas
from ckptd.peers.types import Holding, OpenShard
from ckptd.tiers.disk import DiskTier

log = logging.getLogger("ckptd.replicas")

REPLICA_OWNER_SUFFIX = "\x00replica"


def replica_sidecar(rec: ReplicaRecord) -> dict[str, Any]:
    h = rec.header
    return {
        "job": h.job, "step": h.step, "world_size": h.world_size, "created_unix_s": h.created_unix_s,
        "extra": dict(h.extra), "node_ranks": list(h.node_ranks), "shard": h.entry.to_json(),
        "replica_of": h.source_node,
    }


class SlotReplicaWriter:
    def __init__(self, store: SlotReplicaStore, header: ReplicaHeader, slot: Slot) -> None:
        self.store = store
        self.header = header
        self.slot = slot

    @property
    def buffer(self) -> memoryview:
        return self.slot.view(self.header.nbytes)

    @property
    def file(self) -> Path | None:
        return self.slot.path if self.slot.fresh else None

    async def commit(self) -> tuple[str, ...]:
        s = self.store
        failpoints.hit("peer.replica.before_commit")
        rec = ReplicaRecord(self.header, self.slot)
        s.catalog.replicas[self.header.key] = rec
        self.slot.content = rec
        self.slot.writing = False
        await asyncio.get_running_loop().run_in_executor(s.executor, s.pool.write_sidecar, self.slot,
                                                         replica_sidecar(rec))
        await s.pool.notify()
        s.pool.populate_soon(self.slot)  # written through its file: map it before the next replica
        s.store_on_disk(rec)
        return ("memory",)

    async def abort(self, reason: str) -> None:
        log.warning("replica of %s@%d rank %d dropped: %s", self.header.job, self.header.step,
                    self.header.rank, reason)
        self.slot.content = None
        await self.store.pool.release_write(self.slot)


class SlotReplicaStore:
    def __init__(self, catalog: Catalog, pool: SlotPool, disk: DiskTier | None, executor: Executor,
                 cfg: Config, node_id: str) -> None:
        self.catalog = catalog
        self.pool = pool
        self.disk = disk
        self.executor = executor
        self.cfg = cfg
        self.node_id = node_id
        self.disk_replicas: DiskReplicas | None = None
        self.on_disk: dict[tuple[str, int, int], ReplicaHeader] = {}  # replicas committed on disk
        self._writes: set[asyncio.Task[None]] = set()
        if cfg.peers.store_on_disk:
            if disk is None:
                raise InvalidArgument("peers.store_on_disk needs the disk tier (disk.enabled = true)")
            self.disk_replicas = DiskReplicas(disk.root, disk.direct_io, disk.block_bytes)

    # -- replicas on disk (peers.store_on_disk) ---------------------------------------------
    async def load_disk(self) -> None:
        """Start-up: adopt the replicas committed on disk (removing incomplete ones)."""
        if self.disk_replicas is None:
            return
        found = await asyncio.get_running_loop().run_in_executor(self.executor, self.disk_replicas.scan)
        self.on_disk = {h.key: h for h in found}
        if found:
            log.info("%d replicas held for other nodes found on disk", len(found))

    def store_on_disk(self, rec: ReplicaRecord) -> None:
        """Write a replica just received to disk too, in the background (the slot stays held)."""
        if self.disk_replicas is None or rec.header.key in self.on_disk or rec.slot is None:
            return
        self.pool.hold(rec.slot)
        task = asyncio.create_task(self._store(rec, rec.slot), name=f"replica-disk-{rec.header.key}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _store(self, rec: ReplicaRecord, slot: Slot) -> None:
        assert self.disk_replicas is not None
        h, loop = rec.header, asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self.disk_replicas.put, h, slot.view(h.nbytes))
        except Exception as exc:  # noqa: BLE001 - the RAM copy stands; the disk copy is best effort, logged
            log.warning("replica of %s@%d rank %d not stored on disk: %s", h.job, h.step, h.rank, exc)
            return
        finally:
            await self.pool.release_reader(slot)
        self.on_disk[h.key] = h
        try:
            doomed = await loop.run_in_executor(self.executor, self.disk_replicas.retain,
                                                list(self.on_disk.values()), h)
        except OSError as exc:
            log.warning("could not remove older replicas on disk: %s", exc)
            return
        for old in doomed:
            self.on_disk.pop(old.key, None)

    async def stop(self, timeout_s: float) -> None:
        """Let replica writes to disk finish (they are cancelled after ``timeout_s``)."""
        if self._writes:
            _, pending = await asyncio.wait(set(self._writes), timeout=timeout_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _open_disk_replica(self, h: ReplicaHeader) -> OpenShard:
        assert self.disk_replicas is not None
        slot = await self.pool.lease_scratch(h.nbytes, True, self.cfg.memory.wait_timeout_s,
                                             self.catalog.slot_reusable)
        self.pool.hold(slot)  # pinned while it is filled and served: no other lease takes it
        slot.writing = False
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.disk_replicas.read_into, h,
                                                             slot.view(h.nbytes))
        except BaseException:
            await self.pool.release_reader(slot, free=True)
            raise
        view = slot.view(h.nbytes)

        async def read(offset: int, nbytes: int) -> memoryview:
            return view[offset : offset + nbytes]

        async def release() -> None:
            view.release()
            await self.pool.release_reader(slot, free=True)

        return OpenShard(h, "disk", read, release, view)

    # -- ReplicaSink ------------------------------------------------------------------------
    async def begin_replica(self, header: ReplicaHeader) -> SlotReplicaWriter | None:
        old = self.catalog.live_replica(*header.key)
        if old is not None and old.header.same_bytes(header):
            return None  # already held
        mem = self.cfg.memory
        slot = await self.pool.lease((header.job + REPLICA_OWNER_SUFFIX, header.rank), header.nbytes,
                                     self.catalog.slot_reusable, True,
                                     min(mem.wait_timeout_s, self.cfg.peers.push_timeout_s), mem.slots_per_rank)
        return SlotReplicaWriter(self, header, slot)

    # -- ShardSource ------------------------------------------------------------------------
    async def open_shard(self, job: str, step: int, rank: int) -> OpenShard:
        rep = self.catalog.live_replica(job, step, rank)
        if rep is not None and rep.slot is not None:
            return await self._open_slot(rep.header, rep.slot)
        st = self.catalog.get(job, step)
        own = st.shards.get(rank) if st is not None else None
        if st is not None and own is not None and own.checksummed and own.slot is not None \
                and own.slot.content is own:
            header = ReplicaHeader(job, step, st.world_size, own.entry, self.node_id, st.node_ranks,
                                   st.created_unix_s, dict(st.extra))
            return await self._open_slot(header, own.slot)
        on_disk = self.on_disk.get((job, step, rank))
        if on_disk is not None:
            return await self._open_disk_replica(on_disk)
        if self.disk is not None and st is not None and st.state(TierName.DISK) == TierState.COMMITTED:
            return await self._open_disk(job, step, rank)
        raise NotFound(f"node {self.node_id} holds no copy of {job}@{step} rank {rank}")

    async def _open_slot(self, header: ReplicaHeader, slot: Slot) -> OpenShard:
        self.pool.hold(slot)
        view = slot.view(header.nbytes)

        async def read(offset: int, nbytes: int) -> memoryview:
            return view[offset : offset + nbytes]

        async def release() -> None:
            await self.pool.release_reader(slot)

        return OpenShard(header, "memory", read, release, view)

    async def _open_disk(self, job: str, step: int, rank: int) -> OpenShard:
        assert self.disk is not None
        loop = asyncio.get_running_loop()
        manifest = await loop.run_in_executor(self.executor, self.disk.read_manifest, job, step)
        try:
            entry = manifest.shard(rank)
        except KeyError:
            raise NotFound(f"node {self.node_id} holds no copy of {job}@{step} rank {rank}") from None
        slot = await self.pool.lease_scratch(entry.nbytes, True, self.cfg.memory.wait_timeout_s,
                                             self.catalog.slot_reusable)
        self.pool.hold(slot)  # pinned while it is filled and served: no other lease takes it
        slot.writing = False
        try:
            await loop.run_in_executor(self.executor, self.disk.read_shard_into, job, step, entry,
                                       slot.view(entry.nbytes))
        except BaseException:
            await self.pool.release_reader(slot, free=True)
            raise
        view = slot.view(entry.nbytes)
        header = ReplicaHeader(job, step, manifest.world_size, entry, self.node_id, manifest.node_ranks,
                               manifest.created_unix_s, dict(manifest.extra))

        async def read(offset: int, nbytes: int) -> memoryview:
            return view[offset : offset + nbytes]

        async def release() -> None:
            view.release()
            await self.pool.release_reader(slot, free=True)

        return OpenShard(header, "disk", read, release, view)

    # -- holdings ---------------------------------------------------------------------------
    async def holdings(self, job: str) -> list[Holding]:
        out: list[Holding] = []
        for (j, step, rank), rep in list(self.catalog.replicas.items()):
            if (not job or j == job) and self.catalog.live_replica(j, step, rank) is rep:
                h = rep.header
                held: tuple[str, ...] = ("memory", "disk") if h.key in self.on_disk else ("memory",)
                out.append(Holding(j, step, rank, h.world_size, h.nbytes, held, True, h.source_node))
        for key, h in list(self.on_disk.items()):
            if (not job or h.job == job) and self.catalog.live_replica(*key) is None:
                out.append(Holding(h.job, h.step, h.rank, h.world_size, h.nbytes, ("disk",), True, h.source_node))
        for j in [job] if job else list(self.catalog.jobs):
            for st in self.catalog.steps(j):
                on_disk = st.state(TierName.DISK) == TierState.COMMITTED
                for rank, rec in st.shards.items():
                    in_mem = rec.checksummed and rec.slot is not None and rec.slot.content is rec
                    tiers = (("memory",) if in_mem else ()) + (("disk",) if on_disk else ())
                    if tiers and (st.in_memory or on_disk):
                        out.append(Holding(j, st.step, rank, st.world_size, rec.entry.nbytes, tiers, True,
                                           self.node_id))
        return out

    def adopt_sidecar(self, slot: Slot, meta: dict[str, Any], header: ReplicaHeader) -> None:
        """Re-adopt a verified replica slot found at start-up."""
        rec = ReplicaRecord(header, slot)
        self.catalog.replicas[header.key] = rec
        slot.content = rec
        slot.owner = (header.job + REPLICA_OWNER_SUFFIX, header.rank)


__all__ = ["SlotReplicaStore", "replica_sidecar", "sidecar_meta"]
