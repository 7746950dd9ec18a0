"""Replicas on the holder's disk (peers.store_on_disk) survive a reboot of the holders.

Three daemons stand for three nodes of two ranks each (tests/integration/test_replication.py).
The nodes holding node 2's replicas are "rebooted" (SIGKILL, shm dir wiped, restarted on the same
root), then node 2 is lost entirely: its ranks restore bit-exact from the replicas on the other
nodes' disks. Without store_on_disk the same sequence leaves no copy, which shows the disk
replicas are what served the restore.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
from ckptd_client import Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from tests.conftest import DaemonProc
from tests.fault.faultkit import wait_until
from tests.integration.test_replication import NODES, WORLD, Cluster, _check

STEP_DIR = "step-000000000002"


class DiskCluster(Cluster):
    def __init__(self, factory: Callable[..., DaemonProc], on_disk: bool) -> None:
        super().__init__(factory, None, "")
        self.on_disk = on_disk

    def config(self, node: str) -> str:
        return super().config(node) + f"store_on_disk = {'true' if self.on_disk else 'false'}\n"

    def replica_headers(self) -> list[Path]:
        dirs = [d.root / "data" / ".replicas" / self.job / STEP_DIR for d in self.nodes.values()]
        return [p for step_dir in dirs for p in step_dir.glob("*.json")]

    def reboot(self, node: str) -> None:
        """The node's daemon dies with its RAM (shm wiped); it comes back on the same disk."""
        d = self.nodes[node]
        d.kill()
        shutil.rmtree(d.shm_dir, ignore_errors=True)
        self.nodes[node] = self.factory(root=d.root, shm_dir=d.shm_dir, config_text=self.config(node))


def _plan(d: DaemonProc, job: str, rank: int) -> list[str]:
    with grpc.insecure_channel(f"unix:{d.addr}") as ch:
        resp = pb_grpc.CheckpointServiceStub(ch).PrepareRestore(pb.PrepareRestoreRequest(
            job=job, rank=rank, world_size=WORLD, step=-1, dry_run=True), timeout=30)
    return [f"{s.tier} {s.detail}" for s in resp.plan]


def _lose_node2_after_rebooting_the_others(daemon_factory: Callable[..., DaemonProc], on_disk: bool) -> DiskCluster:
    c = DiskCluster(daemon_factory, on_disk)
    for n in NODES:
        c.start(n)
    for step in (1, 2):
        c.save_all(step)
    c.wait(2, Level.REPLICATED)
    if on_disk:  # every rank's replica of step 2 also reaches its holder's disk (in the background)
        wait_until(lambda: len(c.replica_headers()) == WORLD, 30, "replicas of step 2 on disk")
    for n in ("n1", "n3"):
        c.reboot(n)
    c.wipe("n2")
    c.start("n2")
    return c


def test_disk_replicas_serve_a_lost_node_after_their_holders_rebooted(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    c = _lose_node2_after_rebooting_the_others(daemon_factory, on_disk=True)
    plan = _plan(c.nodes["n2"], c.job, 2)
    assert plan and plan[0].startswith("peer ") and plan[0].endswith(" disk"), plan  # RAM copies are gone
    for rank in (2, 3):
        with c.manager(rank) as m:
            assert _check(m, 2) == "peer"


def test_without_disk_replicas_the_same_loss_leaves_no_copy(daemon_factory: Callable[..., DaemonProc]) -> None:
    c = _lose_node2_after_rebooting_the_others(daemon_factory, on_disk=False)
    assert not c.replica_headers()
    for rank in (2, 3):
        with c.manager(rank) as m:
            assert m.restore({"w": None}) is None  # no surviving copy: a fresh start, nothing restored
