"""The disk source: a rank's shard file in a step committed on this node's disk tier.

The file is read into a scratch slot and verified chunk by chunk as it arrives, so a streamed
restore's client may copy behind the read; the verified slot then becomes the shard's memory copy
(re-warm). Planning reads the step's manifest: it tells whether the rank is in the step and the
world size the step was saved with.
"""

from __future__ import annotations

from concurrent.futures import Executor

from ckptd.core.manifest import ShardEntry
from ckptd.core.types import TierName
from ckptd.memory.catalog import Catalog
from ckptd.restore.sources.base import (
    Filled,
    PlanDraft,
    Reading,
    Source,
    Survey,
    fill_from_tier,
    list_steps,
    plan_manifest,
)
from ckptd.tiers.disk import DiskTier, read_verified, read_verified_chunks


class DiskSource:
    tier = TierName.DISK
    distance = 1

    def __init__(self, disk: DiskTier, catalog: Catalog, executor: Executor) -> None:
        self.disk = disk
        self.catalog = catalog
        self.executor = executor

    async def survey(self, job: str, rank: int | None) -> Survey:
        return await list_steps(self.executor, self.disk, job)

    async def plan(self, survey: Survey, draft: PlanDraft) -> None:
        if draft.step not in survey.steps:
            return
        manifest = await plan_manifest(self.executor, self.disk, draft)
        if manifest is not None:
            draft.saw_world_size(manifest.world_size)
            if draft.rank in manifest.ranks:
                draft.add(self, str(self.disk.step_dir(draft.job, draft.step)))

    async def read_into(self, planned: Source, reading: Reading) -> Filled:
        on_verified = reading.on_verified

        def read(entry: ShardEntry, dst: memoryview) -> None:
            path = self.disk.shard_path(reading.job, reading.step, entry)
            chunks = reading.chunks_of(entry)
            if chunks:  # a ranged restore: those chunks alone, each verified
                read_verified_chunks(path, entry, dst, chunks)
            else:
                read_verified(path, entry, dst, self.disk.block_bytes, on_verified)

        return await fill_from_tier(self.disk, self.catalog, self.executor, reading, read, ready_after=False)
