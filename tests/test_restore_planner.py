"""The Restorer against fake RestoreSources: sources asked nearest first whatever their order,
"latest" the newest step any source holds, the saved world size checked before NotFound, a
rejected copy falls to the next source, and BudgetExhausted ends the restore at once."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.errors import BudgetExhausted, FailedPrecondition, IntegrityError, NotFound
from ckptd.core.manifest import ShardEntry
from ckptd.core.types import TierName
from ckptd.memory.catalog import Catalog
from ckptd.memory.slots import SlotPool
from ckptd.restore.planner import Restorer
from ckptd.restore.sources.base import Filled, PlanDraft, Reading, RestoreSource, Source, Survey

JOB = "plan-job"


class FakeSource:
    def __init__(self, tier: TierName, distance: int, steps: set[int], world_size: int = 2,
                 fail: Exception | None = None) -> None:
        self.tier, self.distance, self.steps, self.world_size, self.fail = tier, distance, steps, world_size, fail
        self.reads = 0

    async def survey(self, job: str, rank: int | None) -> Survey:
        return Survey(frozenset(self.steps))

    async def plan(self, survey: Survey, draft: PlanDraft) -> None:
        if draft.step in survey.steps:
            draft.saw_world_size(self.world_size)
            draft.add(self, f"{self.tier.value}:{draft.step}")

    async def read_into(self, planned: Source, reading: Reading) -> Filled:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        entry = ShardEntry(reading.rank, 0, 4096, (), (), {"d": []})
        slot: Any = object()
        return Filled(entry, slot)


def restorer(tmp_path: Path, sources: list[RestoreSource]) -> Restorer:
    return Restorer(Catalog(), SlotPool(tmp_path / "shm", 2**20), ThreadPoolExecutor(1), 1.0, sources)


def test_sources_are_asked_nearest_first_and_latest_is_the_newest_anywhere(tmp_path: Path) -> None:
    far = FakeSource(TierName.OBJECT, 3, {1, 2, 9})
    near = FakeSource(TierName.DISK, 1, {1, 2})

    async def run() -> None:
        r = restorer(tmp_path, [far, near])
        assert await r.latest(JOB) == 9
        res = await r.plan(JOB, 0, 2, 2)
        assert [(s.tier, s.detail) for s in res.plan] == [(TierName.DISK, "disk:2"), (TierName.OBJECT, "object:2")]
        assert (await r.plan(JOB, 0, 2, None)).step == 9

    asyncio.run(run())


def test_world_size_is_checked_before_not_found(tmp_path: Path) -> None:
    async def run() -> None:
        r = restorer(tmp_path, [FakeSource(TierName.DISK, 1, {3}, world_size=4)])
        with pytest.raises(FailedPrecondition, match="world_size 4"):
            await r.plan(JOB, 0, 2, 3)
        with pytest.raises(NotFound):
            await r.plan(JOB, 0, 2, 5)
        with pytest.raises(NotFound):
            await restorer(tmp_path, []).latest(JOB)

    asyncio.run(run())


def test_a_rejected_copy_falls_to_the_next_source(tmp_path: Path) -> None:
    bad = FakeSource(TierName.MEMORY, 0, {1}, fail=IntegrityError("slot: crc32c mismatch in chunk 0"))
    good = FakeSource(TierName.PEER, 2, {1})

    async def run() -> None:
        r = restorer(tmp_path, [good, bad])
        res = await r.execute(JOB, 0, 2, await r.plan(JOB, 0, 2, 1))
        assert res.served_from == TierName.PEER
        assert res.rejected == ["memory: slot: crc32c mismatch in chunk 0"]
        assert (bad.reads, good.reads) == (1, 1)

    asyncio.run(run())


def test_no_room_ends_the_restore_at_once(tmp_path: Path) -> None:
    full = FakeSource(TierName.DISK, 1, {1}, fail=BudgetExhausted("no room"))
    after = FakeSource(TierName.OBJECT, 3, {1})

    async def run() -> None:
        r = restorer(tmp_path, [full, after])
        with pytest.raises(BudgetExhausted):
            await r.execute(JOB, 0, 2, await r.plan(JOB, 0, 2, 1))
        assert after.reads == 0
        # every copy gone when read (removed meanwhile): NotFound, a clear error, not corruption
        gone = restorer(tmp_path, [FakeSource(TierName.DISK, 1, {1}, fail=NotFound("gone"))])
        with pytest.raises(NotFound, match="removed while it was restored.*disk: gone"):
            await gone.execute(JOB, 0, 2, await gone.plan(JOB, 0, 2, 1))
        # one copy gone, another damaged: the damage is what the caller must hear of
        bad = restorer(tmp_path, [FakeSource(TierName.DISK, 1, {1}, fail=NotFound("gone")),
                                  FakeSource(TierName.OBJECT, 3, {1}, fail=IntegrityError("crc32c mismatch"))])
        with pytest.raises(IntegrityError, match="no valid copy.*disk: gone.*object: crc32c mismatch"):
            await bad.execute(JOB, 0, 2, await bad.plan(JOB, 0, 2, 1))

    asyncio.run(run())
