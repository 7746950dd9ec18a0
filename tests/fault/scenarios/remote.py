"""Faults away from the node: an object store that throttles (503 SlowDown), is down, or is slow
(a fault proxy in front of the S3 server); a peer SIGKILLed, a peer cut off (SIGSTOP), a daemon
SIGKILLed in the middle of replication. Training is never blocked by any of them; the levels they
stop are reported as failed; the level resumes when the store or peer returns."""

from __future__ import annotations

import signal
import time

from ckptd_client import Level

from tests.fault.scenarios import scenario
from tests.fault.scenarios._ctx import Ctx
from tests.fault.scenarios._env import Node
from tests.tiers.faultproxy import Request

MiB = 2**20
BIG = 6 * MiB  # above the 5 MiB part size: every shard goes up as a multipart upload


def _object_node(ctx: Ctx, **extra: object) -> tuple[Node, object]:
    """One rank of BIG bytes: the store faults are about uploads and the global commit, not ranks."""
    ctx.ledger.nbytes = BIG
    ctx.ledger.world_size = 1
    proxy = ctx.env.proxy()
    node = ctx.node(object=ctx.env.object_config(endpoint=proxy.url, **extra))
    return node, proxy


@scenario
def object_503(ctx: Ctx) -> None:
    """The store answers 503 SlowDown to a burst of requests; uploads retry or fail, then persist."""
    node, proxy = _object_node(ctx)
    n503 = ctx.randint("throttled_requests", 1, 8)
    which = ctx.cycle("throttled", ["any request", "chunk uploads", "record and manifest puts"])
    match = {"any request": None, "chunk uploads": Request.is_chunk_put,
             "record and manifest puts": lambda r: r.method == "PUT" and not r.is_chunk_put()}[which]
    proxy.add("503", times=n503, match=match)  # type: ignore[attr-defined]
    node.start()
    ctx.fault(f"the next {n503} matching requests ({which}) answered 503 SlowDown")
    results = []
    for step in (1, 2, 3):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
        err = ctx.ack(step, Level.PERSISTED, timeout_s=60)
        assert not err or "TierFailed" in err, f"step {step}: unclear failure {err}"
        results.append("PERSISTED" if not err else "FAILED")
    assert results[-1] == "PERSISTED", f"the store recovered but step 3 did not persist: {results}"
    ctx.say(f"PERSISTED per step: {results}")
    ctx.check("after throttling")


@scenario
def object_down(ctx: Ctx) -> None:
    """The store goes down (from a step's start, or in the middle of its chunk uploads)."""
    node, proxy = _object_node(ctx, total_timeout_s=4.0, connect_timeout_s=0.5, read_timeout_s=1.0, max_attempts=2)
    node.start()
    ctx.save(1)
    ctx.must_ack(1, Level.PERSISTED, timeout_s=60)
    when = ctx.cycle("down", ["before the upload", "during the chunk uploads"])
    if when == "before the upload":
        proxy.down_for(3600)  # type: ignore[attr-defined]
    else:
        proxy.add("down", match=Request.is_chunk_put, down_s=3600)  # type: ignore[attr-defined]
    ctx.fault(f"store down {when} of step 2")
    ctx.save(2)
    ctx.must_ack(2, Level.LOCAL_DURABLE)
    err = ctx.ack(2, Level.PERSISTED, timeout_s=60)
    assert "TierFailed" in err, f"step 2 with the store down: expected a reported failure, got {err!r}"
    ctx.check("store down", store_reachable=False)
    proxy.up()  # type: ignore[attr-defined]
    ctx.say("store back")
    ctx.save(3)
    ctx.must_ack(3, Level.PERSISTED, timeout_s=60)
    ctx.check("store back")


@scenario
def object_slow(ctx: Ctx) -> None:
    """Every store request is delayed; steps saved back to back are superseded, never queued."""
    node, proxy = _object_node(ctx)
    delay = ctx.uniform("delay_s", 0.1, 0.5)
    n_slow = ctx.randint("slow_requests", 3, 10)
    proxy.add("slow", times=n_slow, delay_s=delay)  # type: ignore[attr-defined]
    node.start()
    ctx.fault(f"the next {n_slow} store requests delayed {delay:.2f}s each")
    for step in (1, 2, 3):
        ctx.save(step)
    ctx.must_ack(3, Level.LOCAL_DURABLE)
    ctx.must_ack(3, Level.PERSISTED, timeout_s=90)
    states = [ctx.tier_state(s, "object") for s in (1, 2)]
    ctx.say(f"step 3 PERSISTED; object tier of steps 1-2: {states} (3 committed, 5 superseded)")
    ctx.check("slow store")


def _pair(ctx: Ctx) -> tuple[list[Node], Node, Node]:
    nodes = ctx.cluster(("n1", "n2"))
    victim = ctx.choose("victim", nodes)
    ctx.params["victim"] = victim.name
    return nodes, victim, next(n for n in nodes if n is not victim)


@scenario
def peer_killed(ctx: Ctx) -> None:
    """A peer daemon SIGKILLed; the survivor keeps saving, REPLICATED degrades, then resumes."""
    nodes, victim, survivor = _pair(ctx)
    for n in nodes:
        n.start()
    ctx.save(1)
    ctx.must_ack(1, Level.REPLICATED)
    for n in nodes:
        ctx.must_ack(1, Level.LOCAL_DURABLE, n)
    victim.kill()
    ctx.fault(f"{victim.name} SIGKILLed", f"daemon@{victim.name}")
    ctx.save(2)  # the victim's ranks fail fast (their daemon is gone), the survivor's stage
    for level in (Level.REPLICATED, Level.LOCAL_DURABLE):  # both global: a rank never saved step 2
        err = ctx.ack(2, level, survivor, timeout_s=5)
        assert err, f"step 2 reported {level.name} with a dead peer and a rank that never saved it"
    ctx.check("peer dead", down={victim.name})
    lost = ctx.cycle("comes_back", ["restarted", "replaced (node lost)"]) != "restarted"
    ctx.restart(victim, wipe_shm=lost, wipe_disk=lost)
    if lost:
        ctx.fault(f"{victim.name} replaced by an empty node", f"node@{victim.name}")
    served = {(1, r): "peer" for r in victim.ranks} if lost else {}
    ctx.check("peer back", served=served, recovered={victim.name})
    step = ctx.resume_replication(3, survivor)
    ctx.say(f"{victim.name} {'replaced' if lost else 'restarted'}; step {step} REPLICATED")
    ctx.check("replication resumed", recovered={victim.name})


@scenario
def peer_cut_off(ctx: Ctx) -> None:
    """A peer stops answering (SIGSTOP); saves and restores on the other node stay bounded."""
    nodes, victim, survivor = _pair(ctx)
    for n in nodes:
        n.start()
    ctx.save(1)
    ctx.must_ack(1, Level.REPLICATED)
    pause = ctx.uniform("cut_off_s", 1.0, 2.5)
    victim.signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        ctx.fault(f"{victim.name} cut off (SIGSTOP) for {pause:.1f}s")
        ctx.save(2, ranks=survivor.ranks)
        t0 = time.monotonic()
        got, served = ctx.restore(survivor.ranks[0], 1)
        restore_s = time.monotonic() - t0
        assert got == 1 and restore_s < 10, f"restore during the cut-off took {restore_s:.1f}s"
        err = ctx.ack(2, Level.REPLICATED, survivor, timeout_s=10)
        assert err, "step 2 reported REPLICATED while its peer was cut off"
        time.sleep(max(0.0, pause - (time.monotonic() - t_stop)))
    finally:
        victim.signal(signal.SIGCONT)
    ctx.say(f"restore during the cut-off {restore_s:.2f}s from {served}; REPLICATED of step 2 reported failed")
    ctx.save(2, ranks=victim.ranks)  # the cut-off rank catches up
    ctx.check("healed")
    ctx.resume_replication(3, survivor)
    ctx.check("replication resumed")


REPLICATION_POINTS = ("peer.replicate.before_push", "peer.replicate.after_push", "peer.replica.before_commit")


@scenario
def daemon_kill_mid_replication(ctx: Ctx) -> None:
    """A daemon SIGKILLed at a failpoint of pushing or receiving a replica; restarted or replaced."""
    nodes, victim, survivor = _pair(ctx)
    point = ctx.choose("failpoint", REPLICATION_POINTS)
    before = ctx.randint("steps_before", 1, 2)
    victim.faults = {"CKPTD_FAILPOINTS": f"{point}=kill@{before + 1}"}  # one hit per step per node
    for n in nodes:
        n.start()
    for step in range(1, before + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.REPLICATED)
    ctx.save(before + 1)
    assert victim.wait_dead(30) == -9, victim.log()[-2000:]
    how = ctx.cycle("restart", ["shm intact", "shm wiped", "node lost"])
    lost = {"shm intact": [], "shm wiped": [f"memory@{victim.name}"], "node lost": [f"node@{victim.name}"]}[how]
    ctx.fault(f"{victim.name} killed at {point} of step {before + 1}", f"daemon@{victim.name}", *lost)
    ctx.restart(victim, wipe_shm=how != "shm intact", wipe_disk=how == "node lost")
    served = {(before, r): "peer" for r in victim.ranks} if how == "node lost" else {}
    ctx.check("after restart", served=served, recovered={victim.name})
    step = ctx.resume_replication(before + 2, survivor)
    ctx.say(f"restart ({how}); step {step} REPLICATED")
    ctx.check("resumed", recovered={victim.name})
