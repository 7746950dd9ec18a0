"""Peer replication across three daemons standing for three nodes (two ranks each).

Each daemon has its own root, shm dir, socket and peer port on loopback; the object tier goes
through a fault proxy in front of moto, which also counts the store's requests. Covered: a node
lost and replaced restores from peer replicas with zero object-store reads; two nodes lost with
k=1 fall back to the store, or report that no copy survives when there is none; a stopped peer
makes replication move along the ring, and with no live peer the level is reported degraded and
replication resumes when the peers return; training's save never waits for any of it.
"""

from __future__ import annotations

import shutil
import signal
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd.core.errors import NotFound, TierFailed
from ckptd.peers.placement import Member, holders_of
from tests._ckptd_helpers import free_port
from tests.conftest import DaemonProc
from tests.state_factory import vector_state
from tests.tiers._moto import MotoS3
from tests.tiers.faultproxy import FaultProxy

WORLD = 6
NODES = ("n1", "n2", "n3")
N = 200_000
TOKEN = "test-peer-token-0123456789"


def _state(step: int, rank: int) -> dict[str, Any]:
    return vector_state(7919 * step + rank, N, step=step)


def _check(m: CheckpointManager, step: int) -> str:
    got: dict[str, Any] = {"w": np.zeros(N, dtype=np.float32), "step": -1}
    assert m.restore(got) == step
    assert got["w"].tobytes() == _state(step, m.rank)["w"].tobytes() and got["step"] == step
    assert m.last_restore is not None
    return m.last_restore.served_from


class Cluster:
    def __init__(self, factory: Callable[..., DaemonProc], object_url: str | None, bucket: str) -> None:
        self.factory = factory
        self.ports = {n: free_port() for n in NODES}
        self.object_url = object_url
        self.bucket = bucket
        self.prefix = f"rep-{uuid.uuid4().hex[:8]}"
        self.job = f"rep{uuid.uuid4().hex[:6]}"
        self.nodes: dict[str, DaemonProc] = {}

    def config(self, node: str) -> str:
        peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in self.ports.items())
        text = (f'[memory]\nchunk_bytes = "256KiB"\n[peers]\nlisten = "127.0.0.1:{self.ports[node]}"\n'
                f'node_id = "{node}"\ntoken = "{TOKEN}"\npeers = "{peers}"\nreplication_factor = 1\n'
                "push_timeout_s = 3.0\nfetch_timeout_s = 30.0\nmax_attempts = 1\n")
        if self.object_url:
            text += (f'[object]\nenabled = true\npreset = "minio"\nendpoint_url = "{self.object_url}"\n'
                     f'region = "us-east-1"\nbucket = "{self.bucket}"\nprefix = "{self.prefix}"\n'
                     'part_size_bytes = "5MiB"\n')
        return text

    def start(self, node: str) -> DaemonProc:
        self.nodes[node] = self.factory(config_text=self.config(node))
        return self.nodes[node]

    def wipe(self, node: str) -> None:
        d = self.nodes.pop(node)
        d.kill()
        shutil.rmtree(d.root, ignore_errors=True)
        shutil.rmtree(d.shm_dir, ignore_errors=True)

    def manager(self, rank: int, node: str | None = None) -> CheckpointManager:
        home = NODES[rank // 2]
        return CheckpointManager(self.job, rank=rank, world_size=WORLD, addr=self.nodes[node or home].addr,
                                 node_ranks=[2 * (rank // 2), 2 * (rank // 2) + 1])

    def save_all(self, step: int) -> list[Any]:
        handles = []
        for rank in range(WORLD):
            with self.manager(rank) as m:
                h = m.save(step, _state(step, rank))
                assert h.ok, h.error
                handles.append((rank, h.step))
        return handles

    def wait(self, step: int, level: Level) -> None:
        for rank in range(WORLD):
            with self.manager(rank) as m:
                m._wait(step, level, 60)


def _split_job() -> str:
    """A job name whose rank 2 replica is placed on node 1 and rank 3 replica on node 3, so that
    losing nodes 2 and 3 leaves one rank with a surviving replica and one without."""
    members = [Member(n) for n in NODES]
    for i in range(1000):
        job = f"split{i}"
        if [holders_of(members, 1, job, r, "n2")[0] for r in (2, 3)] == ["n1", "n3"]:
            return job
    raise AssertionError("no job name splits the replicas")


def _cluster(daemon_factory: Callable[..., DaemonProc], url: str | None, bucket: str,
             job: str | None = None) -> Cluster:
    c = Cluster(daemon_factory, url, bucket)
    if job is not None:
        c.job = job
    for n in NODES:
        c.start(n)
    return c


def test_lost_node_restores_from_peers_with_zero_object_reads(
        daemon_factory: Callable[..., DaemonProc], proxy: FaultProxy, moto_s3: MotoS3) -> None:
    c = _cluster(daemon_factory, proxy.url, moto_s3.bucket)
    for step in (1, 2):
        c.save_all(step)
    c.wait(2, Level.REPLICATED)
    c.wait(2, Level.PERSISTED)
    c.wipe("n2")  # SIGKILL the daemon, lose its RAM and its disk
    c.start("n2")  # a fresh node 2 (same node id and peer address, empty root and shm)
    def object_reads() -> int:  # GETs of objects (shards, manifests, records); listings are not reads
        return len(proxy.requests(lambda r: r.method == "GET" and "list-type" not in r.query))

    before = object_reads()
    for rank in (2, 3):
        with c.manager(rank) as m:
            assert _check(m, 2) == "peer"
    assert object_reads() - before == 0
    with c.manager(2) as m:  # re-warmed: the next restore on the new node is served locally
        assert _check(m, 2) == "memory"


def test_two_nodes_lost_fall_back_to_the_object_store(
        daemon_factory: Callable[..., DaemonProc], proxy: FaultProxy, moto_s3: MotoS3) -> None:
    c = _cluster(daemon_factory, proxy.url, moto_s3.bucket, _split_job())
    c.save_all(1)
    c.wait(1, Level.REPLICATED)
    c.wait(1, Level.PERSISTED)
    c.wipe("n2")
    c.wipe("n3")
    c.start("n2")
    # node 2's ranks: rank 2's replica is on node 1 (alive), rank 3's was on node 3 (lost)
    with c.manager(2) as m:
        assert _check(m, 1) == "peer"
    with c.manager(3) as m:
        assert _check(m, 1) == "object"


def test_two_nodes_lost_without_a_store_is_reported(daemon_factory: Callable[..., DaemonProc]) -> None:
    c = _cluster(daemon_factory, None, "", _split_job())
    c.save_all(1)
    c.wait(1, Level.REPLICATED)
    c.wipe("n2")
    c.wipe("n3")
    c.start("n2")
    with c.manager(2) as m:
        assert _check(m, 1) == "peer"
    with c.manager(3) as m:  # its only replica was on node 3: no copy survives, and restore says so
        got: dict[str, Any] = {"w": np.zeros(N, dtype=np.float32), "step": -1}
        assert m.restore(got) is None  # "latest": nothing to restore for this rank
        with pytest.raises(NotFound):
            m.restore(got, step=1)
        assert got["step"] == -1


def test_stopped_peers_degrade_replication_then_it_resumes(daemon_factory: Callable[..., DaemonProc]) -> None:
    c = _cluster(daemon_factory, None, "")
    c.save_all(1)
    c.wait(1, Level.REPLICATED)
    # node 2 stopped: the other nodes' saves are not blocked, and their replicas that targeted
    # node 2 move to the next node in the ring; once node 2 is back and its ranks saved, the
    # step is REPLICATED on every rank (the coordinator has all six)
    c.nodes["n2"].proc.send_signal(signal.SIGSTOP)
    try:
        for rank in (0, 1, 4, 5):
            with c.manager(rank) as m:
                assert m.save(2, _state(2, rank)).ok
    finally:
        c.nodes["n2"].proc.send_signal(signal.SIGCONT)
    for rank in (2, 3):
        with c.manager(rank) as m:
            assert m.save(2, _state(2, rank)).ok
    c.wait(2, Level.REPLICATED)
    # nodes 2 and 3 stopped: node 1 has no live peer, its level is reported degraded at once
    for n in ("n2", "n3"):
        c.nodes[n].proc.send_signal(signal.SIGSTOP)
    try:
        with c.manager(0) as m0, c.manager(1) as m1:
            for m in (m0, m1):
                assert m.save(3, _state(3, m.rank)).ok  # training is not blocked
            with pytest.raises(TierFailed, match="degraded"):
                m0._wait(3, Level.REPLICATED, 60)
    finally:
        for n in ("n2", "n3"):
            c.nodes[n].proc.send_signal(signal.SIGCONT)
    c.save_all(4)  # the peers are back: replication resumes
    c.wait(4, Level.REPLICATED)
    for d in c.nodes.values():
        assert d.alive()
