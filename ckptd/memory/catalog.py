"""The daemon's in-memory catalog of jobs, steps, shards and their state at every tier.

The catalog is the one place that answers "where is step S of job J, and how durable is it".
It is rebuilt at start-up from what the tiers hold (committed manifests on disk, verified shm
slots), never from a saved pointer. All mutation happens on the event loop; waiters block on one
condition that is notified after every state change.

Invariants:
- a step is committed in memory only when the shards of all its ranks on this node (all
  ``world_size`` ranks for a one-node job) are checksummed in slots;
- a shard's slot is never reused while its step is the newest committed-in-memory step of its
  job, or newer than it (still being staged), or held by a reader;
- tier states only move forward (PENDING -> IN_PROGRESS -> COMMITTED/FAILED/SKIPPED ->
  REMOVED), except that a disk drain abandoned because a shard failed its checksum goes back to
  PENDING; a COMMITTED step is never reported otherwise until retention removes it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptd.core.errors import NotFound, TierFailed, Timeout
from ckptd.core.manifest import Manifest, ReplicaHeader, ShardEntry, _shard_from_obj
from ckptd.core.types import LEVEL_TIER, Level, TierName
from ckptd.memory.slots import Slot

log = logging.getLogger("ckptd.catalog")


class TierState(enum.IntEnum):
    """Per-step, per-tier state; values match the protobuf enum."""

    PENDING = 1
    IN_PROGRESS = 2
    COMMITTED = 3
    FAILED = 4
    SKIPPED = 5
    REMOVED = 6


REACHED = (TierState.COMMITTED, TierState.REMOVED)
FINAL = (TierState.COMMITTED, TierState.FAILED, TierState.SKIPPED, TierState.REMOVED)


@dataclass
class ShardRecord:
    """One rank's shard of a step and its memory copy, if any."""

    job: str
    step: int
    entry: ShardEntry
    slot: Slot | None = None
    checksummed: bool = True  # False between CommitShard and the daemon's crc32c pass
    recorded: bool = True  # False until the slot's sidecar (maybe "crc pending") is written
    writer: str = ""  # the writing client's incarnation (BeginSaveRequest.incarnation); "": unknown
    writer_pid: int = 0  # the writing client's pid, when the daemon could see it alive; 0: unknown


@dataclass
class StepState:
    job: str
    step: int
    world_size: int
    shards: dict[int, ShardRecord] = field(default_factory=dict)
    tiers: dict[TierName, tuple[TierState, str]] = field(default_factory=dict)
    created_unix_s: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)
    #: ranks this daemon holds for the step (multi-node jobs); empty: all ranks (one node)
    node_ranks: tuple[int, ...] = ()
    #: tiers committed for this node's ranks whose level also waits for the other nodes (a
    #: cross-node commit through the coordinator): None while pending, else why it failed
    across_nodes: dict[TierName, str | None] = field(default_factory=dict)
    #: this node's push of the step to its peers has ended, held or degraded (replication.py)
    pushed: bool = False
    #: bytes of the step's committed manifest, for a step known from disk with no shard in memory
    manifest_nbytes: int = 0

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.node_ranks or tuple(range(self.world_size))

    def state(self, tier: TierName) -> TierState:
        return self.tiers.get(tier, (TierState.PENDING, ""))[0]

    def effective(self, tier: TierName) -> tuple[TierState, str]:
        """The state to report: for memory, what the slots hold now, not what they once held."""
        state, msg = self.tiers.get(tier, (TierState.PENDING, ""))
        if tier == TierName.MEMORY:
            if self.in_memory:
                return TierState.COMMITTED, ""
            if state == TierState.COMMITTED:
                return TierState.REMOVED, "slots reused"
        return state, msg

    @property
    def staged_in_slots(self) -> bool:
        """Every shard of this node's ranks is in its slot (checksummed or not yet)."""
        return len(self.shards) == len(self.ranks) and all(
            r.recorded and r.slot is not None and r.slot.content is r for r in self.shards.values())

    @property
    def in_memory(self) -> bool:
        return len(self.shards) == len(self.ranks) and all(
            r.checksummed and r.slot is not None and r.slot.content is r
            for r in self.shards.values()
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the shards held in memory, else of the step's committed manifest (if read)."""
        return sum(r.entry.nbytes for r in self.shards.values()) if self.shards else self.manifest_nbytes

    def manifest(self) -> Manifest:
        return Manifest(
            job=self.job,
            step=self.step,
            world_size=self.world_size,
            shards=tuple(self.shards[r].entry for r in sorted(self.shards)),
            created_unix_s=self.created_unix_s,
            extra=self.extra,
            node_ranks=self.node_ranks,
        )

    @property
    def held(self) -> bool:
        """Is a committed copy of the step held somewhere now (not merely once reached)?"""
        return any(self.effective(t)[0] == TierState.COMMITTED for t in TierName)

    def reached(self, tier: TierName) -> bool:
        """Is the tier's level reached: committed, and on every node where that is global?"""
        return self.state(tier) in REACHED and tier not in self.across_nodes

    def level(self) -> Level | None:
        best: Level | None = None
        for level in Level:
            if self.reached(LEVEL_TIER[level]):
                best = level
        return best


@dataclass
class ReplicaRecord:
    """A shard this daemon holds for another node (peer replication), in a slot."""

    header: ReplicaHeader
    slot: Slot | None = None


class Catalog:
    """Jobs -> steps -> shards, plus a condition for level waiters, plus held replicas."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[int, StepState]] = {}
        self.replicas: dict[tuple[str, int, int], ReplicaRecord] = {}  # (job, step, rank) -> replica
        self._cond = asyncio.Condition()

    def live_replica(self, job: str, step: int, rank: int) -> ReplicaRecord | None:
        rec = self.replicas.get((job, step, rank))
        if rec is None or rec.slot is None or rec.slot.content is not rec:
            return None
        return rec

    def get(self, job: str, step: int) -> StepState | None:
        return self.jobs.get(job, {}).get(step)

    def require(self, job: str, step: int) -> StepState:
        st = self.get(job, step)
        if st is None:
            if job not in self.jobs:
                raise NotFound(f"unknown job {job!r}")
            raise NotFound(f"step {step} of job {job!r} is not known to this daemon")
        return st

    def ensure(self, job: str, step: int, world_size: int) -> StepState:
        steps = self.jobs.setdefault(job, {})
        st = steps.get(step)
        if st is None:
            st = steps[step] = StepState(job, step, world_size)
        return st

    def steps(self, job: str) -> list[StepState]:
        return [self.jobs[job][s] for s in sorted(self.jobs.get(job, {}))]

    def committed(self, job: str, tier: TierName) -> list[int]:
        return [s.step for s in self.steps(job) if s.state(tier) == TierState.COMMITTED]

    def newest_in_memory(self, job: str) -> int | None:
        steps = [s.step for s in self.steps(job) if s.in_memory]
        return max(steps) if steps else None

    def slot_reusable(self, slot: Slot) -> bool:
        """May this slot's content be overwritten? (see module invariants)"""
        rec = slot.content
        if isinstance(rec, ReplicaRecord):  # keep the newest replica of each (job, rank)
            job, step, rank = rec.header.key
            if self.replicas.get((job, step, rank)) is not rec:
                return True
            return any(j == job and r == rank and s > step and self.live_replica(j, s, r) is not None
                       for (j, s, r) in self.replicas)
        if not isinstance(rec, ShardRecord):
            return True
        st = self.get(rec.job, rec.step)
        if st is None or st.shards.get(rec.entry.rank) is not rec:
            return True
        newest = self.newest_in_memory(st.job)
        return newest is not None and st.step < newest

    def forget(self, job: str, step: int) -> None:
        self.jobs.get(job, {}).pop(step, None)

    async def supersede_reused(self, steps: list[StepState], tier: TierName) -> None:
        """Mark SKIPPED at ``tier`` each step still PENDING there whose memory copy was committed
        and whose slots newer saves (or a restore) took before that tier's worker got to it: a
        worker that picks only steps still in their slots would leave it PENDING until the catalog
        forgot it, an acknowledged step with no word of what became of it."""
        for st in steps:
            if st.state(tier) == TierState.PENDING and st.state(TierName.MEMORY) == TierState.COMMITTED \
                    and not st.staged_in_slots:
                await self.set_tier(st, tier, TierState.SKIPPED, "superseded: memory copy reused")

    async def set_tier(self, st: StepState, tier: TierName, state: TierState, msg: str = "") -> None:
        if st.tiers.get(tier, (None, ""))[0] != state:  # one log line per state change of a step
            level = logging.WARNING if state == TierState.FAILED else logging.INFO
            log.log(level, "%s@%d %s tier: %s%s", st.job, st.step, tier.value, state.name,
                    f" ({msg})" if msg else "", extra={"job": st.job, "step": st.step, "tier": tier.value})
        st.tiers[tier] = (state, msg)
        await self.notify()

    async def notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``ready()`` holds (re-checked at every notify); False when ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        async with self._cond:
            while not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=remaining)
                except TimeoutError:
                    pass
            return True

    async def wait_level(self, job: str, step: int, level: Level, timeout_s: float) -> StepState:
        """Wait until the step reaches ``level``; raise if the tier failed or skipped it."""
        tier = LEVEL_TIER[level]
        deadline = time.monotonic() + timeout_s
        async with self._cond:
            while True:
                st = self.require(job, step)
                state, msg = st.tiers.get(tier, (TierState.PENDING, ""))
                if level == Level.STAGED and (st.in_memory or st.level() is not None):
                    return st
                if st.reached(tier):
                    return st
                if st.across_nodes.get(tier):
                    raise TierFailed(f"step {step} of {job!r} will not reach {level.name} on every node: "
                                     f"{st.across_nodes[tier]}")
                mem_state, mem_msg = st.tiers.get(TierName.MEMORY, (TierState.PENDING, ""))
                if mem_state in (TierState.FAILED, TierState.SKIPPED) and not st.in_memory \
                        and state not in REACHED:
                    raise TierFailed(f"step {step} of {job!r} will not reach {level.name}: "
                                     f"memory tier {mem_state.name.lower()}: {mem_msg}")
                if state in (TierState.FAILED, TierState.SKIPPED):
                    raise TierFailed(
                        f"step {step} of {job!r} will not reach {level.name}: "
                        f"{tier.value} tier {state.name.lower()}: {msg}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"step {step} of {job!r} did not reach {level.name} in {timeout_s}s")
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=remaining)
                except TimeoutError:
                    pass


def gc_catalog(catalog: Catalog, job: str, keep_recent: int = 64) -> None:
    """Forget steps that no tier holds any more (keeping the newest few for status queries)."""
    steps = catalog.steps(job)
    for st in steps[:-keep_recent] if keep_recent else steps:
        live = any(r.slot is not None and r.slot.content is r for r in st.shards.values())
        if not live and st.state(TierName.DISK) != TierState.COMMITTED:
            catalog.forget(job, st.step)


def sidecar_meta(st: StepState, rec: ShardRecord) -> dict[str, Any]:
    """What a slot's sidecar records: enough to re-adopt the shard after a daemon restart."""
    shard = rec.entry.to_json()
    meta = {
        "job": st.job,
        "step": st.step,
        "world_size": st.world_size,
        "created_unix_s": st.created_unix_s,
        "extra": st.extra,
        "node_ranks": list(st.node_ranks),
        "shard": shard,
    }
    if rec.writer:
        meta["writer"] = {"incarnation": rec.writer, "pid": rec.writer_pid}
    if not rec.checksummed:  # written right after CommitShard: the bytes are complete, the sums not yet
        shard["chunk_crc32c"] = []
        meta["crc_pending"] = True
    return meta


def entry_from_sidecar(meta: dict[str, Any]) -> tuple[str, int, int, float, ShardEntry]:
    """Parse a sidecar (ValueError/KeyError/TypeError on anything malformed)."""
    from ckptd.core.types import validate_job, validate_node_ranks, validate_rank, validate_step

    job = validate_job(meta["job"])
    step = validate_step(meta["step"])
    world_size = int(meta["world_size"])
    entry = _shard_from_obj(meta["shard"])
    validate_rank(entry.rank, world_size)
    validate_node_ranks(list(meta.get("node_ranks") or []), world_size, entry.rank)
    return job, step, world_size, float(meta.get("created_unix_s", 0.0)), entry
