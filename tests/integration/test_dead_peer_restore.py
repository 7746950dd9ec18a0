"""A dead peer costs a restore served from a local copy one short question, not a retry loop.

The restore planner asks every peer what it holds (a peer may hold a newer step, or the only copy
left). A restore of "latest" used to ask twice (once to choose the step, once to plan it), each
time with the client's full retry budget: with a dead peer, a restore from RAM took 0.32 s
instead of 0.008 s here. Now the peers (and the store) are asked once per restore, with one retry
at most. Checked through the restoring daemon's own log lines: one "not reachable for holdings"
line per restore and at most one retry line, for a restore that is still served from memory and
bit-exact.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests._ckptd_helpers import free_port
from tests.conftest import DaemonProc

TOKEN = "test-peer-token-0123456789"


def _messages(d: DaemonProc) -> list[str]:
    out = []
    for line in d.log().splitlines():
        try:
            out.append(str(json.loads(line)["msg"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def test_a_restore_asks_a_dead_peer_once(daemon_factory: Callable[..., DaemonProc]) -> None:
    ports = {n: free_port() for n in ("n1", "n2")}
    peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
    nodes = {n: daemon_factory(config_text=(
        f'[peers]\nlisten = "127.0.0.1:{ports[n]}"\nnode_id = "{n}"\ntoken = "{TOKEN}"\npeers = "{peers}"\n'
        "replication_factor = 1\nmax_attempts = 3\n")) for n in ports}
    job = f"dead{uuid.uuid4().hex[:6]}"
    state = {"w": np.random.default_rng(5).standard_normal(50_000).astype(np.float32)}
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes["n1"].addr) as m:
        assert m.save(1, state).ok
        m._wait(1, Level.REPLICATED, 60)
    nodes["n2"].kill()
    restores = 3
    before = len(_messages(nodes["n1"]))
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes["n1"].addr) as m:
        for _ in range(restores):
            got = {"w": np.zeros_like(state["w"])}
            assert m.restore(got) == 1
            assert m.last_restore is not None and m.last_restore.served_from == "memory"
            assert got["w"].tobytes() == state["w"].tobytes()
    msgs = _messages(nodes["n1"])[before:]
    unreachable = [x for x in msgs if "not reachable for holdings" in x]
    retries = [x for x in msgs if x.startswith("ListHoldings to peer") and "retry" in x]
    assert len(unreachable) == restores, msgs
    assert len(retries) <= restores, msgs
