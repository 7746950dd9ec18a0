"""The memory source: a rank's shard still held in its shared-memory slot.

Nearest of all sources. The slot is served in place (no copy): ``read_into`` holds it for reading
(``readers`` + 1, given back by the restore lease's release) and verifies every chunk crc32c
first. A slot that fails verification is never served again: its content is dropped and the
step's memory tier is marked FAILED. A slot reused meanwhile (evicted) is NotFound.

A streamed whole-shard restore whose client verifies (``reading.client_verifies``) gets the slot
unread: the client checks every chunk against the crc32c list as it copies, where the bytes are
in its cache anyway, instead of this source reading all of them first. A client that finds a
mismatch restores again without the flag, and this source's own check then fails the copy as
above: every byte served is still checked against its crc32c before the restore returns.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor

from ckptd.core.errors import IntegrityError, NotFound
from ckptd.core.types import TierName
from ckptd.memory.catalog import Catalog, TierState
from ckptd.memory.slots import SlotPool
from ckptd.restore.sources.base import Filled, PlanDraft, Reading, Source, Survey
from ckptd.restore.stream import verify_chunk_list, verify_chunks


class MemorySource:
    tier = TierName.MEMORY
    distance = 0

    def __init__(self, catalog: Catalog, pool: SlotPool, executor: Executor) -> None:
        self.catalog = catalog
        self.pool = pool
        self.executor = executor

    async def survey(self, job: str, rank: int | None) -> Survey:
        return Survey(frozenset(s.step for s in self.catalog.steps(job) if s.in_memory))

    async def plan(self, survey: Survey, draft: PlanDraft) -> None:
        st = self.catalog.get(draft.job, draft.step)
        if st is None or not st.in_memory:
            return
        draft.saw_world_size(st.world_size)
        rec = st.shards.get(draft.rank)
        if rec is not None and rec.slot is not None:
            draft.add(self, str(rec.slot.path))

    async def read_into(self, planned: Source, reading: Reading) -> Filled:
        st = self.catalog.require(reading.job, reading.step)
        rec = st.shards.get(reading.rank)
        slot = rec.slot if rec is not None else None
        if rec is None or slot is None or slot.content is not rec:
            raise NotFound("the memory copy was evicted")
        self.pool.hold(slot)
        try:
            entry = rec.entry
            chunks = reading.chunks_of(entry)
            if reading.client_verifies and not chunks and reading.progress is not None:
                reading.progress.start(TierName.MEMORY, slot, entry, client_verifies=True)
                reading.progress.ready(entry.nbytes)  # written: the client checks it as it copies
                return Filled(entry, slot)
            if reading.progress is not None:
                reading.progress.start(TierName.MEMORY, slot, entry)
            if chunks:  # a ranged restore: only the chunks it reads are verified
                bad = await asyncio.get_running_loop().run_in_executor(
                    self.executor, verify_chunk_list, slot.view(entry.nbytes), entry, chunks)
            else:
                bad = await asyncio.get_running_loop().run_in_executor(
                    self.executor, verify_chunks, slot.view(entry.nbytes), entry, reading.on_verified)
            if bad is not None:
                slot.content = None  # this copy is invalid: never serve it again
                await self.catalog.set_tier(st, TierName.MEMORY, TierState.FAILED,
                                            f"rank {reading.rank} slot failed crc32c")
                raise IntegrityError(f"{slot.path}: crc32c mismatch in chunk {bad}")
        except BaseException:
            await self.pool.release_reader(slot)
            raise
        return Filled(entry, slot)
