"""Replication first: a step's disk write waits for this node's push of it, but never long.

Two daemons stand for two nodes; the job's one rank lives on n1, whose replica goes to n2. With a
healthy peer, n1's log shows the push ending before the disk write of the same step starts (the
two compete for the same slot and CPU; REPLICATED is the faster protection). With the peer
SIGSTOPped and a push timeout far away, the disk write starts after ``peers.drain_wait_s`` and the
step reaches LOCAL_DURABLE while the push is still stuck: a stuck peer never holds disk
durability hostage.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable

import numpy as np
from ckptd_client import CheckpointManager, Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from tests._ckptd_helpers import log_messages, peer_nodes
from tests.conftest import DaemonProc
from tests.state_factory import vector_state

TOKEN = "test-peer-token-0123456789"


def _nodes(factory: Callable[..., DaemonProc], push_timeout_s: float, drain_wait_s: float) -> dict[str, DaemonProc]:
    return peer_nodes(factory, ("n1", "n2"), TOKEN,
                      f"push_timeout_s = {push_timeout_s}\nmax_attempts = 1\ndrain_wait_s = {drain_wait_s}\n")


def _messages(d: DaemonProc) -> list[str]:
    return log_messages(d.log())


def _index(msgs: list[str], needle: str) -> int:
    hits = [i for i, m in enumerate(msgs) if needle in m]
    assert hits, f"no log line with {needle!r} in:\n" + "\n".join(msgs)
    return hits[0]


def test_the_disk_write_of_a_step_starts_after_its_push(daemon_factory: Callable[..., DaemonProc]) -> None:
    nodes = _nodes(daemon_factory, push_timeout_s=30.0, drain_wait_s=30.0)
    job = f"rf{uuid.uuid4().hex[:6]}"
    state = vector_state(3, 2_000_000)
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes["n1"].addr) as m:
        for step in (1, 2):
            assert m.save(step, state).ok
            m._wait(step, Level.REPLICATED, 60)
            m._wait(step, Level.LOCAL_DURABLE, 60)
    msgs = _messages(nodes["n1"])
    for step in (1, 2):
        pushed = _index(msgs, f"{job}@{step}: this node's shards held by n2")
        writing = _index(msgs, f"{job}@{step} disk tier: IN_PROGRESS")
        assert pushed < writing, f"step {step}: the disk write started before the push ended"


def test_a_stuck_peer_delays_the_disk_write_by_drain_wait_s_at_most(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    nodes = _nodes(daemon_factory, push_timeout_s=60.0, drain_wait_s=1.0)
    job = f"rf{uuid.uuid4().hex[:6]}"
    state = {"w": np.arange(500_000, dtype=np.int64)}
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes["n1"].addr) as m:
        assert m.save(1, state).ok
        m._wait(1, Level.REPLICATED, 60)  # n1's channel to n2 is up: the next push gets stuck, not refused
        nodes["n2"].proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            h = m.save(2, state)
            assert h.ok  # training is not blocked by the stuck peer
            m._wait(2, Level.LOCAL_DURABLE, 30)  # far below the 60 s push timeout
            waited_s = time.monotonic() - t0
            peer_state = {t.tier: t.state for t in h.status().tiers}["peer"]
            msgs = _messages(nodes["n1"])
        finally:
            nodes["n2"].proc.send_signal(signal.SIGCONT)
    assert _index(msgs, f"{job}@2 disk tier: COMMITTED") >= 0
    assert not any(f"{job}@2: this node's shards held by" in x for x in msgs), "the push cannot have ended"
    assert peer_state == pb.TIER_IN_PROGRESS
    assert waited_s >= 1.0, "the disk write did not wait for the push at all"
