"""Dead peers: a restore is not held up by them, and a dead coordinator fails REPLICATED soon.

A dead peer costs a restore served from a local copy one short question, not a retry loop.

The restore planner asks every peer what it holds (a peer may hold a newer step, or the only copy
left). A restore of "latest" used to ask twice (once to choose the step, once to plan it), each
time with the client's full retry budget: with a dead peer, a restore from RAM took 0.32 s
instead of 0.008 s here. Now the peers (and the store) are asked once per restore, with one retry
at most. Checked through the restoring daemon's own log lines: one "not reachable for holdings"
line per restore and at most one retry line, for a restore that is still served from memory and
bit-exact.

REPLICATED is a global commit collected by the job's coordinator node. When that node is dead,
a step's peer tier used to stay IN_PROGRESS for ten push timeouts (10 minutes by default), one
polling task per step; now it is FAILED ("coordinator unreachable") once the coordinator has
not answered for ``peers.push_timeout_s``, while the replica itself was pushed and is held.

A lost node's ranks never report. A step used to wait for them until ``peers.commit_timeout_s``
(10 minutes by default) at both global levels; now, once every node that has not reported has
answered no Ping for ``peers.push_timeout_s``, the step fails at once, naming the lost node. A
node that answers is waited for (``test_a_rank_that_never_reports...``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd.core.errors import TierFailed
from ckptd.peers.placement import Member, coordinator_for, preference, shard_key
from tests._ckptd_helpers import log_messages, peer_nodes
from tests.conftest import DaemonProc
from tests.state_factory import vector_state

TOKEN = "test-peer-token-0123456789"


def test_a_restore_asks_a_dead_peer_once(daemon_factory: Callable[..., DaemonProc]) -> None:
    nodes = peer_nodes(daemon_factory, ("n1", "n2"), TOKEN, "max_attempts = 3\n")
    job = f"dead{uuid.uuid4().hex[:6]}"
    state = vector_state(5, 50_000)
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes["n1"].addr) as m:
        assert m.save(1, state).ok
        m._wait(1, Level.REPLICATED, 60)
    nodes["n2"].kill()
    restores = 3
    before = len(log_messages(nodes["n1"].log()))
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes["n1"].addr) as m:
        for _ in range(restores):
            got = {"w": np.zeros_like(state["w"])}
            assert m.restore(got) == 1
            assert m.last_restore is not None and m.last_restore.served_from == "memory"
            assert got["w"].tobytes() == state["w"].tobytes()
    msgs = log_messages(nodes["n1"].log())[before:]
    unreachable = [x for x in msgs if "not reachable for holdings" in x]
    retries = [x for x in msgs if x.startswith("ListHoldings to peer") and "retry" in x]
    assert len(unreachable) == restores, msgs
    assert len(retries) <= restores, msgs


def test_a_dead_coordinator_fails_replicated_after_the_push_timeout(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    names = ("n1", "n2", "n3")
    members = [Member(n) for n in names]
    # a job whose coordinator is n3 and whose rank 0 (on n1) replicates to n2 first
    job = next(j for j in (f"coord{uuid.uuid4().hex[:6]}" for _ in range(10_000))
               if coordinator_for(members, j) == "n3" and preference(members, shard_key(j, 0), "n1")[0] == "n2")
    nodes = peer_nodes(daemon_factory, names, TOKEN, "push_timeout_s = 1.0\nmax_attempts = 1\n")
    nodes["n3"].kill()
    state = {"w": np.arange(10_000, dtype=np.int64)}
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes["n1"].addr) as m:
        assert m.save(1, state).ok
        # ten push timeouts would be 10 s: the step is failed well before that, for the right reason
        with pytest.raises(TierFailed, match="coordinator unreachable"):
            m._wait(1, Level.REPLICATED, 8)
    msgs = log_messages(nodes["n1"].log())
    assert any(f"{job}@1: this node's shards held by n2" in x for x in msgs), msgs  # the push itself worked


def test_a_rank_that_never_reports_fails_the_step_after_commit_timeout_s(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    # rank 1 lives on n2 and never saves step 1: n1's part is pushed, the step waits for rank 1's
    # report until peers.commit_timeout_s (2 s here; ten push timeouts, 10 s, before the key)
    nodes = peer_nodes(daemon_factory, ("n1", "n2"), TOKEN, "push_timeout_s = 1.0\ncommit_timeout_s = 2.0\n")
    job = f"late{uuid.uuid4().hex[:6]}"
    with CheckpointManager(job, rank=0, world_size=2, addr=nodes["n1"].addr, node_ranks=[0]) as m:
        assert m.save(1, {"w": np.arange(1000, dtype=np.int32)}).ok
        with pytest.raises(TierFailed, match=r"ranks \[1\] not reported"):
            m._wait(1, Level.REPLICATED, 8)


def test_a_lost_nodes_missing_ranks_fail_the_step_after_the_push_timeout(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    # ranks 0 on n1, 1 on n2, 2 on n3; n2 is lost before step 1. Its rank can never report, and
    # n2 answers no Ping: the step fails for that reason once n2 has been silent for
    # push_timeout_s (1 s), not after commit_timeout_s (600 s by default), at both global levels.
    names = ("n1", "n2", "n3")
    members = [Member(n) for n in names]
    job = next(j for j in (f"lost{uuid.uuid4().hex[:6]}" for _ in range(10_000))
               if coordinator_for(members, j) != "n2")
    nodes = peer_nodes(daemon_factory, names, TOKEN, "push_timeout_s = 1.0\nmax_attempts = 1\n")
    nodes["n2"].kill()
    state = {"w": np.arange(10_000, dtype=np.int64)}
    with CheckpointManager(job, rank=0, world_size=3, addr=nodes["n1"].addr, node_ranks=[0]) as m0, \
            CheckpointManager(job, rank=2, world_size=3, addr=nodes["n3"].addr, node_ranks=[2]) as m2:
        assert m0.save(1, state).ok and m2.save(1, state).ok
        for m in (m0, m2):
            for level in (Level.REPLICATED, Level.LOCAL_DURABLE):
                with pytest.raises(TierFailed, match=r"ranks \[1\] not reported; node\(s\) n2 unreachable"):
                    m._wait(1, level, 15)
