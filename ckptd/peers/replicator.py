"""Peer replication: push each own shard to k peer daemons, and the peer view restore uses.

``PeerDirectory`` is this node's view of the job's peers (static membership from config or
``CKPTD_PEERS``), one ``PeerClient`` and the placement rule. ``Replicator`` is a background task
owned by the daemon, like the disk drainer: per job it takes the newest step staged on this node
and pushes every own shard (its slot held, so it cannot be reused under the push) along the
shard's placement order (ckptd/peers/placement.py): the first k candidates at once, each failure handing
its place to the next candidate. Older pending steps are SKIPPED (superseded), so a slow peer
delays replication but never queues work, and training never waits for it (save() returns at
STAGED). When every own shard is acknowledged by k peers the node reports its ranks to the job's
coordinator (``placement.coordinator_for``, the same node for every member); the step reaches
REPLICATED when the coordinator has every rank of the step (the global commit at the peer tier).
Fewer than k acknowledgements are reported as FAILED ("degraded") with the reason, and the next
step tries the ring again, so replication resumes when a peer returns.

Replication of one shard along the ring: k acknowledged copies, or a degraded outcome.

``push_to_ring`` pushes to the first k candidates of a placement order (ckptd/peers/placement.py) at
once; each push that fails (dead, stopped, full, refusing) hands its place to the next candidate,
until k peers acknowledged or no candidate is left. Nothing here retries a peer that failed: the
caller (the daemon's replicator) reports the degraded level and tries again later, e.g. when the
peer is back or the membership changed.

Invariants: never more than k pushes run at once; every push is bounded by ``push_timeout_s``
and by the overall deadline; a cancelled call cancels and awaits every push it started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckptd.core import failpoints, metrics
from ckptd.core.config.peers import PeerAddr
from ckptd.core.manifest import ReplicaHeader
from ckptd.core.types import TierName
from ckptd.drains.worker import Worker
from ckptd.memory.catalog import Catalog, StepState, TierState
from ckptd.memory.slots import SlotPool
from ckptd.peers.client import PeerClient
from ckptd.peers.placement import Member, ReadinessBoard, coordinator_for, preference, shard_key
from ckptd.peers.types import Holding, PushResult, ReadyReport, ReadyState

log = logging.getLogger("ckptd.replication")
HOLDINGS_ATTEMPTS = 2  # a retry covers a channel left stale by a peer's restart (peer_client.py)


class PeerDirectory:
    """The job's peers as this node sees them."""

    def __init__(self, node_id: str, members: tuple[PeerAddr, ...], client: PeerClient, k: int,
                 push_timeout_s: float, fetch_timeout_s: float, commit_timeout_s: float = 600.0) -> None:
        self.node_id = node_id
        self.client = client
        self.k = k
        self.push_timeout_s = push_timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self.commit_timeout_s = commit_timeout_s  # bound on waiting for every node's report of a step
        self.board = ReadinessBoard(node_id)  # used when this node coordinates a job
        self.set_members(members)

    def set_members(self, members: tuple[PeerAddr, ...]) -> None:
        """(Re)place the membership: static config at start, or the job's list (SetPeers)."""
        self.addrs = {m.node_id: m for m in members if m.node_id != self.node_id}
        self.members = [Member(m.node_id, m.failure_domain) for m in members]
        self.all_members = [Member(m.node_id, m.failure_domain) for m in members]
        if self.node_id not in {m.node_id for m in self.all_members}:
            self.all_members.append(Member(self.node_id))

    async def report_ready(self, report: ReadyReport) -> ReadyState:
        """Tell the job's coordinator (every node computes the same one) this node's part is ready."""
        coordinator = coordinator_for(self.all_members, report.job)
        if coordinator == self.node_id:
            return await self.board.report(report)
        return await self.client.report_ready(self.addrs[coordinator].target, report)

    def order(self, job: str, rank: int, source: str) -> list[PeerAddr]:
        """Placement order of (job, rank)'s replicas from ``source``: targets, then fallbacks."""
        return [self.addrs[n] for n in preference(self.members, shard_key(job, rank), source) if n in self.addrs]

    async def holdings(self, job: str, deadline_s: float = 2.0, max_attempts: int = HOLDINGS_ATTEMPTS,
                       only: Sequence[str] | None = None) -> dict[str, list[Holding]]:
        """What each reachable peer (of ``only``, when given) holds of job; an unreachable peer is
        simply absent. One retry at most: a dead peer must not hold up a restore served from
        another copy."""
        nodes = list(self.addrs.values()) if only is None else [self.addrs[n] for n in only if n in self.addrs]
        results = await asyncio.gather(*(self.client.list_holdings(p.target, job, deadline_s, max_attempts)
                                         for p in nodes), return_exceptions=True)
        out: dict[str, list[Holding]] = {}
        for peer, res in zip(nodes, results):
            if isinstance(res, BaseException):
                log.info("peer %s not reachable for holdings: %s", peer.node_id, res)
                continue
            out[peer.node_id] = res
        return out


class Replicator(Worker):
    """Owner of the replication task."""

    name = "replicator"

    def __init__(self, catalog: Catalog, pool: SlotPool, peers: PeerDirectory) -> None:
        super().__init__()
        self.catalog = catalog
        self.pool = pool
        self.peers = peers
        self._commits: set[asyncio.Task[None]] = set()

    async def stop(self, timeout_s: float) -> bool:
        for task in list(self._commits):
            task.cancel()
        await asyncio.gather(*self._commits, return_exceptions=True)
        return await super().stop(timeout_s)

    async def _run(self) -> None:
        while not self._stopping:
            await self._wait_kick()
            while not self._stopping and (st := await self._next()) is not None:
                await self._replicate(st)

    async def _next(self) -> StepState | None:
        """Newest pending in-memory step of any job; supersede older pending ones."""
        for job in list(self.catalog.jobs):
            steps = self.catalog.steps(job)
            await self.catalog.supersede_reused(steps, TierName.PEER)  # else a REPLICATED wait times out
            pending = [s for s in steps if s.in_memory and s.state(TierName.PEER) == TierState.PENDING]
            if not pending:
                continue
            for old in pending[:-1]:
                await self.catalog.set_tier(old, TierName.PEER, TierState.SKIPPED,
                                            f"superseded by step {pending[-1].step}")
            return pending[-1]
        return None

    async def _replicate(self, st: StepState) -> None:
        recs = [st.shards[r] for r in sorted(st.shards)]
        slots = [r.slot for r in recs]
        if any(s is None for s in slots):
            return
        if any(s is None or s.content is not r for r, s in zip(recs, slots)):
            # a newer step's save took a slot of this superseded one before it was pushed
            await self.catalog.set_tier(st, TierName.PEER, TierState.SKIPPED, "superseded: memory copy reused")
            return
        for s in slots:
            assert s is not None
            self.pool.hold(s)
        await self.catalog.set_tier(st, TierName.PEER, TierState.IN_PROGRESS)
        failpoints.hit("peer.replicate.before_push")
        k, d = self.peers.k, self.peers
        t0 = time.monotonic()
        try:
            outcomes = await asyncio.gather(*(
                push_to_ring(d.client, d.order(st.job, rec.entry.rank, d.node_id), k,
                             ReplicaHeader(st.job, st.step, st.world_size, rec.entry, d.node_id, st.node_ranks,
                                           st.created_unix_s, dict(st.extra)),
                             rec.slot.view(rec.entry.nbytes),  # type: ignore[union-attr]
                             deadline_s=d.push_timeout_s * 2, push_timeout_s=d.push_timeout_s)
                for rec in recs))
        finally:
            st.pushed = True  # a disk write waiting for this push goes ahead (Daemon._before_drain)
            for s in slots:
                assert s is not None
                await self.pool.release_reader(s)
            await self.catalog.notify()
        for o in outcomes:
            for node in o.holders:
                metrics.PEER_UP.labels(node).set(1)
            for node in o.failures:
                metrics.PEER_UP.labels(node).set(0)
        degraded = [(rec.entry.rank, o) for rec, o in zip(recs, outcomes) if o.degraded]
        if degraded:
            reason = "; ".join(f"rank {r}: held by {len(o.holders)} of {k} peers "
                               f"({', '.join(f'{n}: {why}' for n, why in o.failures.items()) or 'no peers'})"
                               for r, o in degraded)
            log.warning("step %s@%d replication degraded: %s", st.job, st.step, reason)
            await self.catalog.set_tier(st, TierName.PEER, TierState.FAILED, f"degraded: {reason}")
            try:  # tell the coordinator, so other nodes waiting for this step settle at once
                await self.peers.report_ready(ReadyReport(st.job, st.step, st.world_size, "peer",
                                                          self.peers.node_id, st.ranks, True, reason[:500]))
            except Exception as exc:  # noqa: BLE001
                log.info("could not report the degraded step to the coordinator: %s", exc)
            return
        failpoints.hit("peer.replicate.after_push")
        holders = sorted({n for o in outcomes for n in o.holders})
        log.info("step %s@%d: this node's shards held by %s in %.3fs", st.job, st.step, ",".join(holders),
                 time.monotonic() - t0)
        task = asyncio.create_task(self._global_commit(st), name=f"replicated-{st.job}-{st.step}")
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    def push_settled(self, st: StepState) -> bool:
        """This node's push of ``st`` has ended, or will not run (skipped, failed, slots gone)."""
        return (st.pushed or st.state(TierName.PEER) not in (TierState.PENDING, TierState.IN_PROGRESS)
                or st.state(TierName.MEMORY) in (TierState.FAILED, TierState.SKIPPED) or not st.staged_in_slots)

    async def _global_commit(self, st: StepState) -> None:
        """REPLICATED is global: report this node's ranks to the coordinator and wait until every
        rank of the step is reported (or one failed)."""
        report = ReadyReport(st.job, st.step, st.world_size, "peer", self.peers.node_id, st.ranks)
        why = await commit_across_nodes(self.peers, report, self.peers.commit_timeout_s)
        if why is None:
            log.info("step %s@%d REPLICATED on all %d ranks", st.job, st.step, st.world_size)
            await self.catalog.set_tier(st, TierName.PEER, TierState.COMMITTED)
        else:
            await self.catalog.set_tier(st, TierName.PEER, TierState.FAILED, f"degraded: {why}")


PING_INTERVAL_S = 1.0  # how often a step's commit asks the nodes that have not reported whether they are up


class SilentNodes:
    """The members that have not reported a step, pinged (once per ``PING_INTERVAL_S`` at most)
    while this node waits for their reports: which of them stopped answering, and since when."""

    def __init__(self, peers: PeerDirectory) -> None:
        self.peers = peers
        self.down_since: dict[str, float] = {}
        self.next_ping_s = 0.0

    async def gone(self, reported: tuple[str, ...]) -> list[str]:
        """The silent members when every one of them has been unreachable for
        ``peers.push_timeout_s``; [] while any answers (or none is silent)."""
        silent = sorted(n for n in self.peers.addrs if n not in reported)
        if not silent:
            return []
        now = time.monotonic()
        if now >= self.next_ping_s:
            self.next_ping_s = now + PING_INTERVAL_S
            deadline_s = min(PING_INTERVAL_S, self.peers.push_timeout_s)
            answers = await asyncio.gather(*(self.peers.client.ping(self.peers.addrs[n].target, deadline_s, 1)
                                             for n in silent), return_exceptions=True)  # asked again next time
            for node, answer in zip(silent, answers):
                if isinstance(answer, Exception):
                    self.down_since.setdefault(node, now)
                else:
                    self.down_since.pop(node, None)
        limit_s = self.peers.push_timeout_s
        return silent if all(now - self.down_since.get(n, now) >= limit_s for n in silent) else []


REPORT_WAIT_S = 5.0  # how long the coordinator may hold a report (a long poll) before answering "not yet"


def report_wait_s(push_timeout_s: float) -> float:
    """The long poll of a step's report: short enough that a lost node's check (``SilentNodes``,
    after ``push_timeout_s``) runs about as often as before, at most ``REPORT_WAIT_S``."""
    return max(0.2, min(REPORT_WAIT_S, push_timeout_s / 4))


async def commit_across_nodes(peers: PeerDirectory, report: ReadyReport, timeout_s: float) -> str | None:
    """Report this node's ranks of a step at a tier to the step's coordinator, then wait until
    every rank is reported (None) or one failed, the coordinator stayed unreachable for
    ``peers.push_timeout_s`` or ``timeout_s`` passed (the reason). The report is a long poll: the
    coordinator answers when the step settles or after ``report_wait_s`` (then it is sent again:
    re-reporting is idempotent), so a node sends about one report per step and tier instead of
    one every 0.2 s (docs/scale.md). Other nodes may legitimately take long to report (their own
    pushes, a straggling rank's save), hence the long ``timeout_s``; an unreachable coordinator
    is failed sooner, or every step of the job would stay in progress and keep a poller for that
    long. So is a step whose missing ranks can only come from nodes that are gone: when every
    member that has not reported has answered no Ping for ``peers.push_timeout_s`` (a lost node's
    ranks are lost with it; a node that answers, however slow, is waited for). Pings start only
    after a long poll came back unsettled, so a step that commits within it pings nobody."""
    deadline = time.monotonic() + timeout_s
    unreachable_since: float | None = None
    silent = SilentNodes(peers)
    wait_s = 0.0 if report.failed else report_wait_s(peers.push_timeout_s)
    while True:
        sent = time.monotonic()
        try:
            state = await peers.report_ready(dataclasses.replace(report, wait_s=min(wait_s, max(
                0.0, deadline - sent))))
        except Exception as exc:  # noqa: BLE001 - coordinator unreachable: the reason says so
            why = f"coordinator unreachable: {exc}"
            now = time.monotonic()
            unreachable_since = now if unreachable_since is None else unreachable_since
            if now - unreachable_since >= peers.push_timeout_s:
                return why
        else:
            unreachable_since = None
            if state.complete:
                return None
            if state.failed_ranks:
                return f"ranks {list(state.failed_ranks)} will not get there"
            why = f"ranks {sorted(set(range(report.world_size)) - set(state.ready_ranks))} not reported"
            if not report.failed and (gone := await silent.gone(state.ready_nodes)):
                return f"{why}; node(s) {', '.join(gone)} unreachable for {peers.push_timeout_s:g}s"
        if report.failed or time.monotonic() > deadline:
            return why
        await asyncio.sleep(max(0.0, 0.2 - (time.monotonic() - sent)))  # a coordinator that did not hold it


ring_log = logging.getLogger("ckptd.peer")


@dataclass
class RingOutcome:
    """Who acknowledged a replica, and why the others did not."""

    k: int
    holders: dict[str, PushResult] = field(default_factory=dict)  # candidate node id -> its ack
    failures: dict[str, str] = field(default_factory=dict)  # node id -> reason

    @property
    def degraded(self) -> bool:
        return len(self.holders) < self.k


async def push_to_ring(client: PeerClient, candidates: Sequence[PeerAddr], k: int, header: ReplicaHeader,
                       view: memoryview, deadline_s: float, push_timeout_s: float | None = None) -> RingOutcome:
    """Push to the first k candidates at once; each failure hands its place to the next candidate.

    ``candidates`` is a placement order (targets first, then fallbacks: ckptd/peers/placement.py).
    Every push gets ``push_timeout_s`` (default: all the time left), bounded by ``deadline_s``.
    """
    out = RingOutcome(k)
    deadline = time.monotonic() + deadline_s
    queue = list(candidates)
    running: dict[asyncio.Task[PushResult], PeerAddr] = {}
    try:
        while len(out.holders) < k:
            while queue and len(running) + len(out.holders) < k:
                peer = queue.pop(0)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    out.failures[peer.node_id] = "replication deadline passed before this peer was tried"
                    continue
                budget = remaining if push_timeout_s is None else min(push_timeout_s, remaining)
                running[asyncio.create_task(client.push(peer.target, header, view, budget))] = peer
            if not running:
                break
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                peer = running.pop(task)
                try:
                    out.holders[peer.node_id] = task.result()
                except Exception as exc:  # noqa: BLE001 - any failure hands the place on
                    ring_log.warning("replica of %s@%d rank %d not held by %s: %s", header.job, header.step,
                                header.rank, peer.node_id, exc)
                    out.failures[peer.node_id] = f"{type(exc).__name__}: {exc}"
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    return out
