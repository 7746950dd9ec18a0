"""Deterministic ring placement of replicas: which k peers hold a shard, and who comes next.

Placement is pure functions, no I/O: every daemon of the job (and the restore planner, and ckptctl) computes
the same answer from the same membership. Rendezvous (highest-random-weight) hashing ranks every
candidate node by ``blake2b(key, node_id)``; the order is then made failure-domain aware by three
stable passes over that ranking:

1. nodes whose domain is neither the source's nor one already chosen (one node per new domain);
2. the remaining nodes outside the source's domain;
3. everything else.

``targets`` are the first k of that order and ``fallbacks`` the rest (tried, in order, when a
target is dead). A node without a domain label counts as a domain of its own.

Invariants (tested with hypothesis): the result depends only on the set of members, not their
order; the source never places on itself; targets span as many distinct domains other than the
source's as the membership allows; and removing a node only moves that node's share: every other
target of every key stays a target (adding a node, symmetrically, displaces at most one).

The coordinator side of ReportReady: ``ReadinessBoard`` merges, per (job, step, tier), the
ranks that nodes report ready or failed. A step is complete at a tier when all ``world_size``
ranks are ready there; a later report for a rank replaces an earlier one (a replacement node).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from ckptd.core.errors import FailedPrecondition, NotFound, TierFailed, Timeout
from ckptd.peers.types import ReadyReport, ReadyState


@dataclass(frozen=True, order=True)
class Member:
    node_id: str
    failure_domain: str = ""

    @property
    def domain(self) -> str:
        return self.failure_domain or f"\x00node:{self.node_id}"


@dataclass(frozen=True)
class Placement:
    key: str
    source: str
    targets: tuple[str, ...]
    fallbacks: tuple[str, ...]

    @property
    def order(self) -> tuple[str, ...]:
        return self.targets + self.fallbacks


def shard_key(job: str, rank: int) -> str:
    """The placement key of one rank's shards (stable across steps: replicas of the same rank keep
    landing on the same peers, so their slots are reused there)."""
    return f"{job}/rank-{rank}"


def normalize(members: Iterable[Member]) -> tuple[Member, ...]:
    """Sorted, de-duplicated membership; one node id with two different domains is an error."""
    by_id: dict[str, Member] = {}
    for m in members:
        seen = by_id.get(m.node_id)
        if seen is not None and seen != m:
            raise ValueError(f"node {m.node_id!r} is listed with failure domains "
                             f"{seen.failure_domain!r} and {m.failure_domain!r}")
        by_id[m.node_id] = m
    return tuple(by_id[n] for n in sorted(by_id))


def score(key: str, node_id: str) -> int:
    """The rendezvous weight of node_id for key (stable across processes and platforms)."""
    digest = hashlib.blake2b(f"{key}\x00{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preference(members: Iterable[Member], key: str, source: str, exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """Every candidate (members minus the source and ``exclude``) in placement order."""
    ms = normalize(members)
    skip = set(exclude) | {source}
    src = next((m for m in ms if m.node_id == source), Member(source))
    ranked = sorted((m for m in ms if m.node_id not in skip), key=lambda m: (-score(key, m.node_id), m.node_id))
    first: list[Member] = []
    used = {src.domain}
    for m in ranked:
        if m.domain not in used:
            first.append(m)
            used.add(m.domain)
    picked = {m.node_id for m in first}
    second = [m for m in ranked if m.node_id not in picked and m.domain != src.domain]
    picked.update(m.node_id for m in second)
    third = [m for m in ranked if m.node_id not in picked]
    return tuple(m.node_id for m in (*first, *second, *third))


def place(members: Iterable[Member], k: int, key: str, source: str, exclude: Iterable[str] = ()) -> Placement:
    """The k targets of ``key`` from ``source`` and the fallback order after them.

    ``exclude`` removes nodes known dead; by the minimal-movement invariant the surviving targets
    stay targets and the dead ones' places go to the next candidates.
    """
    if k < 0:
        raise ValueError("k must not be negative")
    order = preference(members, key, source, exclude)
    return Placement(key, source, order[:k], order[k:])


def coordinator_for(members: Iterable[Member], job: str) -> str:
    """A node every member agrees on to collect readiness reports of ``job``'s steps, for when the
    job's rank -> node map is unknown (static membership): the rendezvous winner for the job.
    Where the map is known (membership gathered through torch.distributed), DESIGN.md's rule --
    the daemon of rank 0 -- applies instead."""
    order = preference(members, f"{job}/coordinator", source="")
    if not order:
        raise ValueError("no members to choose a coordinator from")
    return order[0]


def holders_of(members: Iterable[Member], k: int, job: str, rank: int, source: str) -> tuple[str, ...]:
    """Where the restore planner looks for a lost node's shard first: its placement order (the k
    targets, then the fallbacks a degraded replication may have used)."""
    return place(members, k, shard_key(job, rank), source).order


@dataclass
class _StepReadiness:
    world_size: int
    ready: dict[int, str] = field(default_factory=dict)  # rank -> node
    failed: dict[int, str] = field(default_factory=dict)  # rank -> reason


KEEP_STEPS = 64  # steps a coordinator remembers behind the newest reported one, per job


class ReadinessBoard:
    """The coordinator's view of which ranks of each step reached which tier."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._steps: dict[tuple[str, int, str], _StepReadiness] = {}
        self._cond = asyncio.Condition()
        self._settled: dict[tuple[str, int, str], asyncio.Event] = {}  # long polls wait on these

    def _is_settled(self, key: tuple[str, int, str]) -> bool:
        e = self._steps.get(key)
        return e is not None and (len(e.ready) == e.world_size or bool(e.failed))

    async def report(self, r: ReadyReport) -> ReadyState:
        r.validate()
        if (r.job, r.step, r.tier) not in self._steps:
            self._prune(r.job, r.step)
        entry = self._steps.setdefault((r.job, r.step, r.tier), _StepReadiness(r.world_size))
        if entry.world_size != r.world_size:
            raise FailedPrecondition(f"step {r.step} of {r.job!r} has world_size {entry.world_size}, "
                                     f"node {r.node_id} reports {r.world_size}")
        for rank in r.ranks:
            if r.failed:
                entry.ready.pop(rank, None)
                entry.failed[rank] = f"{r.node_id}: {r.message}"
            else:
                entry.failed.pop(rank, None)
                entry.ready[rank] = r.node_id
        key = (r.job, r.step, r.tier)
        settled = self._settled.setdefault(key, asyncio.Event())
        if self._is_settled(key):
            settled.set()  # every report held for this step is answered now, each woken once
        async with self._cond:
            self._cond.notify_all()
        if r.wait_s > 0 and not settled.is_set():  # a long poll: answer when settled, or after wait_s
            try:
                await asyncio.wait_for(settled.wait(), r.wait_s)
            except TimeoutError:
                pass
        return self.state(r.job, r.step, r.tier)

    def state(self, job: str, step: int, tier: str) -> ReadyState:
        e = self._steps.get((job, step, tier))
        if e is None:
            raise NotFound(f"no readiness reported for {job}@{step} at {tier}")
        return ReadyState(job, step, tier, e.world_size, tuple(sorted(e.ready)), tuple(sorted(e.failed)),
                          self.node_id, tuple(sorted(set(e.ready.values()))))

    def failures(self, job: str, step: int, tier: str) -> dict[int, str]:
        e = self._steps.get((job, step, tier))
        return dict(e.failed) if e else {}

    async def wait_complete(self, job: str, step: int, tier: str, timeout_s: float) -> ReadyState:
        """Wait until every rank is ready at the tier; TierFailed as soon as one rank failed."""
        def settled() -> bool:
            e = self._steps.get((job, step, tier))
            return e is not None and (len(e.ready) == e.world_size or bool(e.failed))
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(settled), timeout_s)
            except TimeoutError:
                raise Timeout(f"{job}@{step} not ready at {tier} on every rank in {timeout_s}s") from None
        failed = self.failures(job, step, tier)
        if failed:
            raise TierFailed(f"{job}@{step} will not be complete at {tier}: "
                             + "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items())))
        return self.state(job, step, tier)

    def newest_complete(self, job: str, tier: str) -> int | None:
        steps = [s for (j, s, t), e in self._steps.items() if j == job and t == tier
                 and len(e.ready) == e.world_size]
        return max(steps) if steps else None

    def _prune(self, job: str, step: int) -> None:
        """Forget the job's steps more than ``KEEP_STEPS`` older than ``step`` (a board reported
        to every step of a long job must not grow without bound)."""
        for key in [k for k in self._steps if k[0] == job and k[1] < step - KEEP_STEPS]:
            del self._steps[key]
            self._settled.pop(key, None)

    def forget(self, job: str, step: int) -> None:
        for key in [k for k in self._steps if k[0] == job and k[1] == step]:
            del self._steps[key]
            self._settled.pop(key, None)
