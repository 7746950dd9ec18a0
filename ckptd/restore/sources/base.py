"""The RestoreSource protocol: one place a rank's shard can be restored from, and what it shares.

Job: the planner (``restore/planner.py``) asks every source in turn, nearest first, and never
switches on where a copy lives. A source answers three questions:
- ``survey(job, rank)``: which steps of the job it holds committed (for ``rank``'s shard where the
  answer depends on the rank; ``rank`` None asks for whole steps only). A store that cannot be
  listed is a missing source (an empty survey), never a failed restore.
- ``plan(survey, draft)``: whether it can serve ``(draft.step, draft.rank)``; if so it adds one
  ``Source`` per copy to the draft, and reports the world size the step was saved with. No bytes
  are read; a manifest may be.
- ``read_into(planned, reading)``: fill a slot with the shard and verify size and every chunk
  crc32c before returning; on any failure nothing is returned and every slot it leased is given
  back (``reading.discard``). The slot returned is held for reading (``readers`` counted) and
  ``Filled.adopt_into`` names the catalog step whose memory copy it becomes (None when it
  already is one).

Invariants: a source never hands out unverified bytes; ``reading.progress`` hears ``start`` once
per slot and ``ready(n)`` only for verified prefixes. Sources hold their collaborators from
construction; nothing is assigned to them later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Final, Protocol

from ckptd.core.errors import CkptdError, InvalidArgument
from ckptd.core.integrity import covering_chunks
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import TierName
from ckptd.memory.catalog import Catalog, StepState, TierState
from ckptd.memory.slots import Slot
from ckptd.restore.stream import RestoreProgress
from ckptd.tiers.base import Tier

log = logging.getLogger("ckptd.restore")


@dataclass(frozen=True)
class Copy:
    """One copy of a shard a source found while surveying (a peer's, say)."""

    key: str  # the source's own handle of the copy (a peer's node id)
    detail: str  # where it is, for the plan a client sees
    world_size: int


@dataclass(frozen=True)
class Survey:
    """What one source holds of a job: committed steps, and per step the copies it found."""

    steps: frozenset[int]
    copies: Mapping[int, tuple[Copy, ...]] = field(default_factory=dict)


@dataclass
class Source:
    """One planned source of a restore: the tier, where, and the source that will read it."""

    tier: TierName
    detail: str
    origin: RestoreSource = field(compare=False, repr=False)
    key: str = field(default="", compare=False, repr=False)


@dataclass
class PlanDraft:
    """The plan of one restore while the sources are asked, nearest first."""

    job: str
    step: int
    rank: int
    entries: list[Source] = field(default_factory=list)
    world_size: int | None = None  # as the nearest source that knows the step recorded it

    def saw_world_size(self, world_size: int) -> None:
        if self.world_size is None:
            self.world_size = world_size

    def add(self, origin: RestoreSource, detail: str, key: str = "") -> None:
        self.entries.append(Source(origin.tier, detail, origin, key))


LeaseFn = Callable[[TierName, ShardEntry, int], Awaitable[Slot]]


@dataclass(frozen=True)
class ReadScope:
    """What of a shard one restore reads, and who checks it."""

    #: a ranged restore: only these byte ranges (offset, length) of the shard are needed (the
    #: daemon checks the chunks covering them); empty: the whole shard
    ranges: tuple[tuple[int, int], ...] = ()
    #: the client checks every chunk's crc32c as it copies (a streamed, whole-shard restore)
    client_verifies: bool = False


WHOLE_SHARD: Final = ReadScope()  # the default: every byte, checked by the daemon


@dataclass
class Reading:
    """One restore's read of one shard, as the planner hands it to a source."""

    job: str
    rank: int
    step: int
    world_size: int
    progress: RestoreProgress | None
    #: a scratch slot of nbytes for entry's copy from tier, held for reading, progress started
    lease: LeaseFn
    #: give back a slot ``lease`` returned (the read failed)
    discard: Callable[[Slot], Awaitable[None]]
    #: a ranged restore: only these byte ranges (offset, length) of the shard are needed; sources
    #: that can read the chunks covering them alone do (``chunks_of``), the others read it whole
    ranges: tuple[tuple[int, int], ...] = ()
    #: the client checks every chunk's crc32c as it copies (a streamed, whole-shard restore): a
    #: source serving a slot in place may skip its own read (the memory source does)
    client_verifies: bool = False

    def chunks_of(self, entry: ShardEntry) -> tuple[int, ...]:
        """The crc32c chunks of entry covering ``ranges`` (empty: not a ranged restore)."""
        if not self.ranges:
            return ()
        try:
            return tuple(covering_chunks(self.ranges, entry.chunk_bytes, entry.nbytes)) or (0,)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    def bytes_read(self, entry: ShardEntry) -> int:
        """What a source that reads only the covering chunks reads of entry."""
        chunks = self.chunks_of(entry)
        if not chunks:
            return entry.nbytes
        return sum(min(entry.chunk_bytes, entry.nbytes - i * entry.chunk_bytes) for i in chunks)

    @property
    def on_verified(self) -> Callable[[int], None] | None:
        """Called from any thread with each verified prefix length (streamed restores; not for a
        ranged restore, whose client waits for the end)."""
        return self.progress.ready_threadsafe if self.progress is not None and not self.ranges else None


@dataclass
class Filled:
    """A slot filled with a verified copy of the shard."""

    entry: ShardEntry
    slot: Slot
    adopt_into: StepState | None = None  # the step whose memory copy the slot becomes, if any


class RestoreSource(Protocol):
    """One place a shard can be restored from (memory, a peer, the disk, the object store)."""

    @property
    def tier(self) -> TierName: ...

    @property
    def distance(self) -> int:
        """How far the copy is: the planner asks sources in ascending distance."""
        ...

    async def survey(self, job: str, rank: int | None) -> Survey: ...

    async def plan(self, survey: Survey, draft: PlanDraft) -> None: ...

    async def read_into(self, planned: Source, reading: Reading) -> Filled: ...


# -- shared by the sources reading a manifest-committed tier (disk, object) -------------------------


async def list_steps(executor: Executor, tier: Tier, job: str) -> Survey:
    """The committed steps of job at tier; an unreachable store is a missing source."""
    try:
        steps = await asyncio.get_running_loop().run_in_executor(executor, tier.list_committed, job)
    except CkptdError as exc:
        log.warning("restore: cannot list %s tier: %s", tier.name.value, exc)
        steps = []
    return Survey(frozenset(steps))


async def plan_manifest(executor: Executor, tier: Tier, draft: PlanDraft) -> Manifest | None:
    """A tier's manifest of the draft's step; an unusable one is fatal only with no other source."""
    try:
        return await asyncio.get_running_loop().run_in_executor(
            executor, tier.read_manifest, draft.job, draft.step)
    except CkptdError as exc:
        if not draft.entries:
            raise
        log.warning("restore plan of %s@%d: %s manifest unusable: %s",
                    draft.job, draft.step, tier.name.value, exc)
        return None


async def fill_from_tier(tier: Tier, catalog: Catalog, executor: Executor, reading: Reading,
                         read: Callable[[ShardEntry, memoryview], None], ready_after: bool) -> Filled:
    """Read rank's shard of a committed step at tier into a scratch slot with ``read`` (blocking,
    verifying); ``ready_after``: ``read`` reports no prefixes, the whole shard is ready after it."""
    loop = asyncio.get_running_loop()
    manifest = await loop.run_in_executor(executor, tier.read_manifest, reading.job, reading.step)
    entry = manifest.shard(reading.rank)
    slot = await reading.lease(tier.name, entry, entry.nbytes)
    try:
        await loop.run_in_executor(executor, read, entry, slot.view(entry.nbytes))
        if ready_after and reading.progress is not None:
            reading.progress.ready(entry.nbytes)
    except BaseException:
        await reading.discard(slot)
        raise
    st = manifest_step(catalog, manifest.job, manifest.step, reading.world_size, manifest.extra, tier.name)
    return Filled(entry, slot, st)


def manifest_step(catalog: Catalog, job: str, step: int, world_size: int, extra: dict[str, object],
                  source: TierName = TierName.DISK) -> StepState:
    """The catalog entry of a step found committed at ``source``. A step restored from the object
    store stays PENDING on disk: once its shards are back in memory the drainer re-warms the disk."""
    st = catalog.ensure(job, step, world_size)
    if st.state(source) == TierState.PENDING:
        st.tiers[source] = (TierState.COMMITTED, "")
    st.extra = dict(extra)
    return st
