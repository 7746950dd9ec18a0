"""Restore planning and execution for one rank: nearest valid copy first.

Planning does no I/O beyond what the catalog and a directory listing know: for the chosen step it
lists the sources in the order they will be tried (memory slot, local disk). Execution verifies
size and every chunk crc32c of each candidate and falls to the next source on any failure,
recording why each rejected copy was rejected. A copy read from disk lands in a leased slot
that is then adopted as the memory copy of that shard (re-warm), so the memory tier holds the
step again once every rank has restored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from ckptd.core import metrics
from ckptd.core.errors import BudgetExhausted, CkptdError, FailedPrecondition, IntegrityError, NotFound
from ckptd.core.manifest import Manifest, ReplicaHeader, ShardEntry
from ckptd.core.types import TierName
from ckptd.memory.catalog import Catalog, ShardRecord, StepState, TierState, sidecar_meta
from ckptd.memory.slots import Slot, SlotPool
from ckptd.peers.replicator import PeerDirectory
from ckptd.peers.types import FileBacked, Holding
from ckptd.restore.stream import RestoreProgress, verify_chunks
from ckptd.tiers.base import Tier
from ckptd.tiers.disk import DiskTier, read_verified

log = logging.getLogger("ckptd.restore")


@dataclass
class Source:
    tier: TierName
    detail: str


@dataclass
class RestoreResult:
    step: int
    plan: list[Source]
    entry: ShardEntry | None = None
    slot: Slot | None = None
    served_from: TierName | None = None
    rejected: list[str] = field(default_factory=list)
    read_s: float = 0.0


class Restorer:
    def __init__(self, catalog: Catalog, pool: SlotPool, disk: DiskTier | None, executor: Executor,
                 wait_timeout_s: float, object_tier: Tier | None = None, peers: PeerDirectory | None = None,
                 on_adopt: Callable[[], None] | None = None) -> None:
        self.catalog = catalog
        self.pool = pool
        self.disk = disk
        self.object = object_tier
        self.executor = executor
        self.wait_timeout_s = wait_timeout_s
        self.on_adopt = on_adopt  # e.g. wake the drainer to re-warm the disk, the replicator to top up
        self.peers = peers  # when peer replication is configured
        self.prepared: dict[tuple[str, int], str] = {}  # (job, rank) -> slot id made for its restore

    def restore_slots(self) -> list[tuple[str, int, Slot, int | None]]:
        """(job, rank, slot, step) of the slot each rank's restore would read first, which its
        client may map ahead: the memory copy of the job's newest step held in RAM, and slots
        prepared for a rank's restore from peers (restore_prep.py) still free and empty (step None)."""
        out: list[tuple[str, int, Slot, int | None]] = []
        for (job, rank), slot_id in sorted(self.prepared.items()):
            slot = self.pool.slots.get(slot_id)
            if slot is not None and slot.content is None and not slot.writing and slot.readers == 0:
                out.append((job, rank, slot, None))
        for job in sorted(self.catalog.jobs):
            held = [st for st in self.catalog.steps(job) if st.in_memory]
            if held:
                out.extend((job, rank, rec.slot, held[-1].step) for rank, rec in sorted(held[-1].shards.items())
                           if rec.slot is not None)
        return out

    def _tier(self, name: TierName) -> Tier:
        tier = self.disk if name == TierName.DISK else self.object
        assert tier is not None
        return tier

    async def _steps(self, tier: Tier | None, job: str) -> list[int]:
        if tier is None:
            return []
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, tier.list_committed, job)
        except CkptdError as exc:  # an unreachable store is a missing source, not a failed restore
            log.warning("restore: cannot list %s tier: %s", tier.name.value, exc)
            return []

    async def _disk_steps(self, job: str) -> list[int]:
        return await self._steps(self.disk, job)

    async def _peer_sources(self, job: str, rank: int) -> dict[int, list[tuple[str, Holding]]]:
        """step -> [(node, holding)] of rank's copies on reachable peers, in placement order."""
        if self.peers is None:
            return {}
        held = await self.peers.holdings(job)
        order = [p.node_id for p in self.peers.order(job, rank, self.peers.node_id)]
        out: dict[int, list[tuple[str, Holding]]] = {}
        for node in sorted(held, key=lambda n: order.index(n) if n in order else len(order)):
            for h in held[node]:
                if h.rank == rank and h.step_complete:
                    out.setdefault(h.step, []).append((node, h))
        return out

    async def latest(self, job: str, rank: int | None = None,
                     peer_sources: dict[int, list[tuple[str, Holding]]] | None = None,
                     object_steps: list[int] | None = None) -> int:
        """Newest step committed at any reachable tier (for ``rank``'s copies on peers); the
        peers and the store are asked here unless the caller passes what they answered."""
        candidates = [s.step for s in self.catalog.steps(job) if s.in_memory]
        candidates += await self._disk_steps(job)
        candidates += object_steps if object_steps is not None else await self._steps(self.object, job)
        if rank is not None:
            candidates += list(peer_sources if peer_sources is not None else await self._peer_sources(job, rank))
        if not candidates:
            raise NotFound(f"no committed step of job {job!r} at any tier")
        return max(candidates)

    async def plan(self, job: str, rank: int, world_size: int, step: int | None) -> RestoreResult:
        # peers and the store are asked once, for "latest" and for the plan
        peer_sources, object_steps = await asyncio.gather(self._peer_sources(job, rank),
                                                          self._steps(self.object, job))
        if step is None:
            step = await self.latest(job, rank, peer_sources, object_steps)
        plan: list[Source] = []
        st = self.catalog.get(job, step)
        known_ws: int | None = None
        if st is not None and st.in_memory:
            known_ws = st.world_size
            rec = st.shards.get(rank)
            if rec is not None and rec.slot is not None:
                plan.append(Source(TierName.MEMORY, str(rec.slot.path)))
        if self.disk is not None and step in await self._disk_steps(job):
            manifest = await self._plan_manifest(self.disk, job, step, bool(plan))
            if manifest is not None:
                known_ws = manifest.world_size if known_ws is None else known_ws
                if rank in manifest.ranks:
                    plan.append(Source(TierName.DISK, str(self.disk.step_dir(job, step))))
        for node, holding in peer_sources.get(step, []):
            known_ws = holding.world_size if known_ws is None else known_ws
            plan.append(Source(TierName.PEER, f"{node} {'/'.join(holding.tiers)}"))
        if self.object is not None and step in object_steps:
            if plan and known_ws is not None:
                # a nearer source exists: the store is the last resort, its manifest read only if used
                plan.append(Source(TierName.OBJECT, f"{job}@{step} rank {rank}"))
            else:
                manifest = await self._plan_manifest(self.object, job, step, bool(plan))
                if manifest is not None:
                    known_ws = manifest.world_size if known_ws is None else known_ws
                    if rank in manifest.ranks:
                        key = manifest.shard(rank).object_key
                        plan.append(Source(TierName.OBJECT, key or f"{job}@{step} rank {rank}"))
        # The world-size check comes first: a rank the saved step never had (rank >= the saved
        # world size) must get this clear error, not NotFound (which restore("latest") reads as
        # "no checkpoint yet" and silently starts fresh).
        if known_ws is not None and known_ws != world_size:
            raise FailedPrecondition(
                f"step {step} of {job!r} was saved with world_size {known_ws}, restore asked for "
                f"{world_size}; resharding is not supported yet"
            )
        if not plan:
            raise NotFound(f"step {step} of job {job!r} is not committed at any reachable tier")
        return RestoreResult(step=step, plan=plan)

    async def _plan_manifest(self, tier: Tier, job: str, step: int, have_source: bool) -> Manifest | None:
        """A tier's manifest of step for planning; an unusable one is fatal only with no other source."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, tier.read_manifest, job, step)
        except CkptdError as exc:
            if not have_source:
                raise
            log.warning("restore plan of %s@%d: %s manifest unusable: %s", job, step, tier.name.value, exc)
            return None

    async def execute(self, job: str, rank: int, world_size: int, result: RestoreResult,
                      progress: RestoreProgress | None = None) -> RestoreResult:
        """Fill a slot from the first valid source of the plan; ``progress`` (streamed restores)
        hears of each source started, each verified prefix and each source rejected."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        for source in result.plan:
            try:
                if source.tier == TierName.MEMORY:
                    await self._from_memory(job, rank, result, progress)
                elif source.tier == TierName.PEER:
                    await self._from_peer(source.detail.split()[0], job, rank, result, progress)
                else:
                    await self._from_tier(source.tier, job, rank, world_size, result, progress)
            except BudgetExhausted:
                raise  # no room for any source's copy: say so, not "no valid copy"
            except CkptdError as exc:
                log.warning("restore %s@%d rank %d: %s copy rejected: %s",
                            job, result.step, rank, source.tier.value, exc)
                result.rejected.append(f"{source.tier.value}: {exc}")
                if progress is not None:
                    progress.failed_source(result.rejected[-1])
                if isinstance(exc, IntegrityError):
                    metrics.CHECKSUM_FAILURES.labels(source.tier.value).inc()
                continue
            result.served_from = source.tier
            result.read_s = time.monotonic() - t0
            metrics.RESTORES_TOTAL.labels(source.tier.value).inc()
            if result.entry is not None:
                metrics.TIER_READ_BYTES.labels(source.tier.value).inc(result.entry.nbytes)
                metrics.TIER_OP_SECONDS.labels(source.tier.value, "restore").observe(result.read_s)
            del loop
            return result
        raise IntegrityError(
            f"no valid copy of {job}@{result.step} rank {rank}: " + "; ".join(result.rejected)
        )

    async def _from_memory(self, job: str, rank: int, result: RestoreResult,
                           progress: RestoreProgress | None) -> None:
        st = self.catalog.require(job, result.step)
        rec = st.shards.get(rank)
        slot = rec.slot if rec is not None else None
        if rec is None or slot is None or slot.content is not rec:
            raise NotFound("the memory copy was evicted")
        slot.readers += 1
        try:
            entry = rec.entry
            if progress is not None:
                progress.start(TierName.MEMORY, slot, entry)
            bad = await asyncio.get_running_loop().run_in_executor(
                self.executor, verify_chunks, slot.view(entry.nbytes), entry,
                progress.ready_threadsafe if progress is not None else None)
            if bad is not None:
                slot.content = None  # this copy is invalid: never serve it again
                await self.catalog.set_tier(st, TierName.MEMORY, TierState.FAILED,
                                            f"rank {rank} slot failed crc32c")
                raise IntegrityError(f"{slot.path}: crc32c mismatch in chunk {bad}")
        except BaseException:
            await self.pool.unpin(slot)
            raise
        result.entry, result.slot = entry, slot

    async def _from_tier(self, name: TierName, job: str, rank: int, world_size: int,
                         result: RestoreResult, progress: RestoreProgress | None) -> None:
        """Read a shard from a disk or object tier into a scratch slot, verified, then adopt it."""
        tier = self._tier(name)
        loop = asyncio.get_running_loop()
        manifest = await loop.run_in_executor(self.executor, tier.read_manifest, job, result.step)
        entry = manifest.shard(rank)
        slot = await self.pool.lease_scratch(entry.nbytes, True, self.wait_timeout_s,
                                             self.catalog.slot_reusable, self.prepared.pop((job, rank), None))
        slot.readers += 1
        slot.writing = False
        try:
            if progress is not None:
                progress.start(name, slot, entry)
            on_verified = progress.ready_threadsafe if progress is not None else None
            if isinstance(tier, DiskTier):  # verified chunk by chunk, so a client can copy behind
                await loop.run_in_executor(self.executor, read_verified, tier.shard_path(job, result.step, entry),
                                           entry, slot.view(entry.nbytes), tier.block_bytes, on_verified)
            else:
                await loop.run_in_executor(
                    self.executor, tier.read_shard_into, job, result.step, entry, slot.view(entry.nbytes))
                if progress is not None:
                    progress.ready(entry.nbytes)
        except BaseException:
            slot.readers -= 1
            await self.pool.free(slot)
            raise
        st = manifest_step(self.catalog, manifest.job, manifest.step, world_size, manifest.extra, name)
        rec = self._adopt(st, entry, slot)
        if rec is not None:
            try:
                await loop.run_in_executor(self.executor, self.pool.write_sidecar, slot,
                                           sidecar_meta(st, rec))
            except OSError as exc:
                log.warning("could not record re-warmed slot %s: %s", slot.path, exc)
            if self.on_adopt is not None:
                self.on_adopt()
        await self.pool.notify()
        result.entry, result.slot = entry, slot

    async def _from_peer(self, node: str, job: str, rank: int, result: RestoreResult,
                         progress: RestoreProgress | None) -> None:
        """Fetch rank's shard from a peer into a scratch slot (verified by the client), adopt it."""
        assert self.peers is not None
        peer = self.peers.addrs[node]
        slots: list[Slot] = []

        async def lease(h: ReplicaHeader) -> memoryview | FileBacked:
            slot = await self.pool.lease_scratch(h.nbytes, True, self.wait_timeout_s, self.catalog.slot_reusable,
                                                 self.prepared.pop((job, rank), None))
            slot.readers += 1
            slot.writing = False
            slots.append(slot)
            if progress is not None:
                progress.start(TierName.PEER, slot, h.entry)
            # a new slot's pages are not mapped in here yet: the bytes go through its file (shm.py)
            return FileBacked(slot.view(h.nbytes), slot.path) if slot.fresh else slot.view(h.nbytes)

        try:
            res = await self.peers.client.fetch_into(peer.target, job, result.step, rank, lease,
                                                     self.peers.fetch_timeout_s,
                                                     progress.ready_threadsafe if progress is not None else None)
        except BaseException:
            for s in slots:
                s.readers -= 1
                await self.pool.free(s)
            raise
        h, slot = res.header, slots[0]
        st = self.catalog.ensure(job, result.step, h.world_size)
        st.extra = dict(h.extra)
        st.created_unix_s = h.created_unix_s
        if not st.shards:
            st.node_ranks = h.node_ranks
        rec = self._adopt(st, h.entry, slot)
        if rec is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self.pool.write_sidecar, slot,
                                                                 sidecar_meta(st, rec))
            except OSError as exc:
                log.warning("could not record re-warmed slot %s: %s", slot.path, exc)
            if self.on_adopt is not None:
                self.on_adopt()
        await self.pool.notify()
        result.entry, result.slot = h.entry, slot

    def _adopt(self, st: StepState, entry: ShardEntry, slot: Slot) -> ShardRecord | None:
        """Make a verified restore slot the memory copy of its shard (re-warm)."""
        old = st.shards.get(entry.rank)
        if old is not None and old.slot is not None and old.slot.content is old:
            return None  # a memory copy already exists
        rec = ShardRecord(st.job, st.step, entry, slot)
        st.shards[entry.rank] = rec
        slot.content = rec
        slot.owner = (st.job, entry.rank)
        return rec


def manifest_step(catalog: Catalog, job: str, step: int, world_size: int, extra: dict[str, object],
                  source: TierName = TierName.DISK) -> StepState:
    """The catalog entry of a step found committed at ``source``. A step restored from the object
    store stays PENDING on disk: once its shards are back in memory the drainer re-warms the disk."""
    st = catalog.ensure(job, step, world_size)
    if st.state(source) == TierState.PENDING:
        st.tiers[source] = (TierState.COMMITTED, "")
    st.extra = dict(extra)
    return st
