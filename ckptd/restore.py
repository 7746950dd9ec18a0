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
from concurrent.futures import Executor
from dataclasses import dataclass, field

from ckptd import metrics
from ckptd.catalog import Catalog, ShardRecord, StepState, TierState, sidecar_meta
from ckptd.errors import CkptdError, FailedPrecondition, IntegrityError, NotFound
from ckptd.integrity import first_bad_chunk
from ckptd.manifest import ShardEntry
from ckptd.shm import Slot, SlotPool
from ckptd.tiers.disk import DiskTier
from ckptd.types import TierName

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
                 wait_timeout_s: float) -> None:
        self.catalog = catalog
        self.pool = pool
        self.disk = disk
        self.executor = executor
        self.wait_timeout_s = wait_timeout_s

    async def _disk_steps(self, job: str) -> list[int]:
        if self.disk is None:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.disk.list_committed, job)

    async def latest(self, job: str) -> int:
        """Newest step committed at any reachable tier."""
        candidates = [s.step for s in self.catalog.steps(job) if s.in_memory]
        candidates += await self._disk_steps(job)
        if not candidates:
            raise NotFound(f"no committed step of job {job!r} at any tier")
        return max(candidates)

    async def plan(self, job: str, rank: int, world_size: int, step: int | None) -> RestoreResult:
        if step is None:
            step = await self.latest(job)
        plan: list[Source] = []
        st = self.catalog.get(job, step)
        known_ws: int | None = None
        if st is not None and st.in_memory:
            known_ws = st.world_size
            rec = st.shards.get(rank)
            if rec is not None and rec.slot is not None:
                plan.append(Source(TierName.MEMORY, str(rec.slot.path)))
        if step in await self._disk_steps(job):
            assert self.disk is not None
            try:
                manifest = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.disk.read_manifest, job, step)
            except CkptdError as exc:
                if not plan:
                    raise
                log.warning("restore plan of %s@%d: disk manifest unusable: %s", job, step, exc)
            else:
                known_ws = manifest.world_size if known_ws is None else known_ws
                if rank in manifest.ranks:
                    plan.append(Source(TierName.DISK, str(self.disk.step_dir(job, step))))
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

    async def execute(self, job: str, rank: int, world_size: int, result: RestoreResult) -> RestoreResult:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        for source in result.plan:
            try:
                if source.tier == TierName.MEMORY:
                    await self._from_memory(job, rank, result)
                else:
                    await self._from_disk(job, rank, world_size, result)
            except CkptdError as exc:
                log.warning("restore %s@%d rank %d: %s copy rejected: %s",
                            job, result.step, rank, source.tier.value, exc)
                result.rejected.append(f"{source.tier.value}: {exc}")
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

    async def _from_memory(self, job: str, rank: int, result: RestoreResult) -> None:
        st = self.catalog.require(job, result.step)
        rec = st.shards.get(rank)
        slot = rec.slot if rec is not None else None
        if rec is None or slot is None or slot.content is not rec:
            raise NotFound("the memory copy was evicted")
        slot.readers += 1
        try:
            entry = rec.entry
            bad = await asyncio.get_running_loop().run_in_executor(
                self.executor, first_bad_chunk, slot.view(entry.nbytes), entry.chunk_bytes,
                entry.chunk_crc32c)
            if bad is not None:
                slot.content = None  # this copy is invalid: never serve it again
                await self.catalog.set_tier(st, TierName.MEMORY, TierState.FAILED,
                                            f"rank {rank} slot failed crc32c")
                raise IntegrityError(f"{slot.path}: crc32c mismatch in chunk {bad}")
        except BaseException:
            await self.pool.unpin(slot)
            raise
        result.entry, result.slot = entry, slot

    async def _from_disk(self, job: str, rank: int, world_size: int, result: RestoreResult) -> None:
        assert self.disk is not None
        loop = asyncio.get_running_loop()
        manifest = await loop.run_in_executor(self.executor, self.disk.read_manifest, job, result.step)
        entry = manifest.shard(rank)
        slot = await self.pool.lease_scratch(entry.nbytes, True, self.wait_timeout_s)
        slot.readers += 1
        slot.writing = False
        try:
            await loop.run_in_executor(
                self.executor, self.disk.read_shard_into, job, result.step, entry, slot.view(entry.nbytes))
        except BaseException:
            slot.readers -= 1
            await self.pool.free(slot)
            raise
        st = manifest_step(self.catalog, manifest.job, manifest.step, world_size, manifest.extra)
        rec = self._adopt(st, entry, slot)
        if rec is not None:
            try:
                await loop.run_in_executor(self.executor, self.pool.write_sidecar, slot,
                                           sidecar_meta(st, rec))
            except OSError as exc:
                log.warning("could not record re-warmed slot %s: %s", slot.path, exc)
        await self.pool.notify()
        result.entry, result.slot = entry, slot

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


def manifest_step(catalog: Catalog, job: str, step: int, world_size: int, extra: dict[str, object]) -> StepState:
    st = catalog.ensure(job, step, world_size)
    if st.state(TierName.DISK) == TierState.PENDING:
        st.tiers[TierName.DISK] = (TierState.COMMITTED, "")
    st.extra = dict(extra)
    return st
