"""The object source: a rank's shard in a step committed in the object store.

The farthest source, the last resort: when a nearer source is planned and the step's world size
is already known, the store's manifest is not read while planning (only if the restore gets that
far). The shard is read into a scratch slot with the tier's verified ranged GETs and becomes the
shard's memory copy (re-warm); the step stays PENDING on disk, so the drainer re-warms the disk.
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
from ckptd.tiers.base import Tier


class ObjectSource:
    tier = TierName.OBJECT
    distance = 3

    def __init__(self, store: Tier, catalog: Catalog, executor: Executor) -> None:
        self.store = store
        self.catalog = catalog
        self.executor = executor

    async def survey(self, job: str, rank: int | None) -> Survey:
        return await list_steps(self.executor, self.store, job)

    async def plan(self, survey: Survey, draft: PlanDraft) -> None:
        if draft.step not in survey.steps:
            return
        fallback = f"{draft.job}@{draft.step} rank {draft.rank}"
        if draft.entries and draft.world_size is not None:
            draft.add(self, fallback)  # a nearer source exists: the manifest is read only if used
            return
        manifest = await plan_manifest(self.executor, self.store, draft)
        if manifest is not None:
            draft.saw_world_size(manifest.world_size)
            if draft.rank in manifest.ranks:
                draft.add(self, manifest.shard(draft.rank).object_key or fallback)

    async def read_into(self, planned: Source, reading: Reading) -> Filled:
        def read(entry: ShardEntry, dst: memoryview) -> None:
            chunks = reading.chunks_of(entry)
            read_chunks = getattr(self.store, "read_chunks_into", None)  # the S3 tier has ranged GETs
            if chunks and read_chunks is not None:  # a ranged restore: those chunks' GETs alone
                read_chunks(reading.job, reading.step, entry, dst, chunks)
            else:
                self.store.read_shard_into(reading.job, reading.step, entry, dst)

        return await fill_from_tier(self.store, self.catalog, self.executor, reading, read, ready_after=True)
