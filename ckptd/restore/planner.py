"""Restore planning and execution for one rank: nearest valid copy first.

The ``Restorer`` receives its sources (``restore/sources``: memory, disk, peers, object store)
and its ``on_adopt`` callback at construction and asks the sources in ascending distance; it never
switches on where a copy lives. Planning reads no shard bytes: every source is surveyed once
(concurrently) for the job's committed steps, "latest" is the newest step any of them holds, and
each source then adds the copies it can serve of the chosen step. Execution tries the planned
copies in order; each source verifies size and every chunk crc32c, and the restore falls to the
next copy on any failure, recording why each rejected copy was rejected. A copy read from
elsewhere than memory lands in a leased slot that is then adopted as the memory copy of that
shard (re-warm), so the memory tier holds the step again once every rank has restored;
``on_adopt`` is called after each adoption (the daemon wakes its drainer and replicator).

Invariants: a world size other than the one the step was saved with is FailedPrecondition,
checked before NotFound; BudgetExhausted (no room for any copy) ends the restore at once; a step
whose every planned copy was gone when read (removed meanwhile) is NotFound, and any damaged copy
among them makes it IntegrityError.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from ckptd.core import metrics
from ckptd.core.errors import BudgetExhausted, CkptdError, FailedPrecondition, IntegrityError, NotFound
from ckptd.core.manifest import ShardEntry
from ckptd.core.types import TierName
from ckptd.memory.catalog import Catalog, ShardRecord, StepState, sidecar_meta
from ckptd.memory.slots import Slot, SlotPool
from ckptd.restore.sources.base import (
    WHOLE_SHARD,
    Filled,
    PlanDraft,
    Reading,
    ReadScope,
    RestoreSource,
    Source,
    Survey,
)
from ckptd.restore.stream import RestoreProgress

__all__ = ["RestoreResult", "Restorer", "Source"]

log = logging.getLogger("ckptd.restore")


@dataclass
class RestoreResult:
    step: int
    plan: list[Source]
    entry: ShardEntry | None = None
    slot: Slot | None = None
    served_from: TierName | None = None
    rejected: list[str] = field(default_factory=list)
    read_s: float = 0.0
    unusable: list[int] = field(default_factory=list)  # newer steps skipped: no valid copy of this shard


class Restorer:
    def __init__(self, catalog: Catalog, pool: SlotPool, executor: Executor, wait_timeout_s: float,
                 sources: Sequence[RestoreSource], on_adopt: Callable[[], None] | None = None) -> None:
        self.catalog = catalog
        self.pool = pool
        self.executor = executor
        self.wait_timeout_s = wait_timeout_s
        self.sources = sorted(sources, key=lambda s: s.distance)  # nearest first; ties keep their order
        self.on_adopt = on_adopt  # after a restored slot became a memory copy (re-warm the disk, replicas)
        self.prepared: dict[tuple[str, int], str] = {}  # (job, rank) -> slot id made for its restore

    def restore_slots(self) -> list[tuple[str, int, Slot, int | None]]:
        """(job, rank, slot, step) of the slot each rank's restore would read first, which its
        client may map ahead: the memory copy of the job's newest step held in RAM, and slots
        prepared for a rank's restore from peers (restore_prep.py) still free and empty (step None)."""
        out: list[tuple[str, int, Slot, int | None]] = []
        for (job, rank), slot_id in sorted(self.prepared.items()):
            slot = self.pool.slots.get(slot_id)
            if slot is not None and slot.content is None and not slot.writing and slot.readers == 0 \
                    and not slot.retired:
                out.append((job, rank, slot, None))
        for job in sorted(self.catalog.jobs):
            held = [st for st in self.catalog.steps(job) if st.in_memory]
            if held:
                out.extend((job, rank, rec.slot, held[-1].step) for rank, rec in sorted(held[-1].shards.items())
                           if rec.slot is not None)
        return out

    async def _survey(self, job: str, rank: int | None) -> list[Survey]:
        return list(await asyncio.gather(*(s.survey(job, rank) for s in self.sources)))

    @staticmethod
    def _newest(job: str, surveys: list[Survey], below: int | None = None) -> int:
        steps = [step for survey in surveys for step in survey.steps if below is None or step < below]
        if not steps:
            raise NotFound(f"no committed step of job {job!r} at any tier"
                           + (f" older than step {below}" if below is not None else ""))
        return max(steps)

    async def latest(self, job: str, rank: int | None = None) -> int:
        """Newest step committed at any reachable source (peers count for ``rank``'s copies only)."""
        return self._newest(job, await self._survey(job, rank))

    async def latest_below(self, job: str, rank: int, below: int | None) -> int:
        """Newest step committed at any reachable source and older than ``below`` (if given)."""
        return self._newest(job, await self._survey(job, rank), below)

    async def plan(self, job: str, rank: int, world_size: int, step: int | None,
                   below: int | None = None) -> RestoreResult:
        """Plan the restore of ``step``, or of the newest step (older than ``below`` if given)."""
        surveys = await self._survey(job, rank)  # asked once, for "latest" and for the plan
        if step is None:
            step = self._newest(job, surveys, below)
        draft = PlanDraft(job, step, rank)
        for source, survey in zip(self.sources, surveys):
            await source.plan(survey, draft)
        # The world-size check comes first: a rank the saved step never had (rank >= the saved
        # world size) must get this clear error, not NotFound (which restore("latest") reads as
        # "no checkpoint yet" and silently starts fresh).
        if draft.world_size is not None and draft.world_size != world_size:
            raise FailedPrecondition(
                f"step {step} of {job!r} was saved with world_size {draft.world_size}, restore asked for "
                f"{world_size}; resharding is not supported yet"
            )
        if not draft.entries:
            raise NotFound(f"step {step} of job {job!r} is not committed at any reachable tier")
        return RestoreResult(step=step, plan=draft.entries)

    async def execute(self, job: str, rank: int, world_size: int, result: RestoreResult,
                      progress: RestoreProgress | None = None, scope: ReadScope = WHOLE_SHARD) -> RestoreResult:
        """Fill a slot from the first valid source of the plan; ``progress`` (streamed restores)
        hears of each source started, each verified prefix and each source rejected. With
        ``scope.ranges`` (byte ranges of the shard) the sources that can read only the chunks
        covering them do, and the slot is not adopted as the shard's memory copy (it is partly
        filled); ``scope.client_verifies``: the client checks the chunks as it copies (streamed
        restores only; sources/base.py Reading)."""
        t0 = time.monotonic()

        async def lease(tier: TierName, entry: ShardEntry, nbytes: int) -> Slot:
            slot = await self.pool.lease_scratch(nbytes, True, self.wait_timeout_s, self.catalog.slot_reusable,
                                                 self.prepared.pop((job, rank), None))
            self.pool.hold(slot)
            slot.writing = False
            if progress is not None:
                progress.start(tier, slot, entry)
            return slot

        reading = Reading(job, rank, result.step, world_size, progress, lease, self._discard, scope.ranges,
                          scope.client_verifies and progress is not None)
        vanished = 0  # copies that were gone when read (NotFound), not damaged
        for source in result.plan:
            try:
                filled = await source.origin.read_into(source, reading)
                if filled.adopt_into is not None and not reading.ranges:  # a partly read slot is no copy
                    await self._adopt(filled.adopt_into, filled)
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
                vanished += isinstance(exc, NotFound)
                continue
            result.entry, result.slot = filled.entry, filled.slot
            result.served_from = source.tier
            result.read_s = time.monotonic() - t0
            metrics.RESTORES_TOTAL.labels(source.tier.value).inc()
            metrics.TIER_READ_BYTES.labels(source.tier.value).inc(reading.bytes_read(filled.entry))
            metrics.TIER_OP_SECONDS.labels(source.tier.value, "restore").observe(result.read_s)
            return result
        if vanished == len(result.plan):  # every copy went while it was read (removed by retention, rm)
            raise NotFound(f"{job}@{result.step} rank {rank} was removed while it was restored: "
                           + "; ".join(result.rejected))
        raise IntegrityError(
            f"no valid copy of {job}@{result.step} rank {rank}: " + "; ".join(result.rejected)
        )

    async def _discard(self, slot: Slot) -> None:
        """Give back a scratch slot whose read failed (freed once no reader holds it)."""
        await self.pool.release_reader(slot, free=True)

    async def _adopt(self, st: StepState, filled: Filled) -> None:
        """Make a verified restore slot the memory copy of its shard (re-warm), unless one exists."""
        rec = self._adopt_record(st, filled.entry, filled.slot)
        if rec is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self.pool.write_sidecar,
                                                                 filled.slot, sidecar_meta(st, rec))
            except OSError as exc:
                log.warning("could not record re-warmed slot %s: %s", filled.slot.path, exc)
            if self.on_adopt is not None:
                self.on_adopt()
        await self.pool.notify()

    @staticmethod
    def _adopt_record(st: StepState, entry: ShardEntry, slot: Slot) -> ShardRecord | None:
        old = st.shards.get(entry.rank)
        if old is not None and old.slot is not None and old.slot.content is old:
            return None  # a memory copy already exists
        rec = ShardRecord(st.job, st.step, entry, slot)
        st.shards[entry.rank] = rec
        slot.content = rec
        slot.owner = (st.job, entry.rank)
        return rec
