"""A real network partition between two peers in separate network namespaces.

Two namespaces joined by a veth pair (private addresses, nothing routed anywhere else): the
receiving peer runs in one, the pushing client in the other. Taking the receiver's end of the
link down drops packets silently (no reset, no refusal): the push must fail with a typed error
within its deadline; bringing it back up, replication resumes and the replica fetches bit-exact.
Skipped, with the reason, where namespaces cannot be created (not root, no `ip`, no CAP_NET_ADMIN).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.peer._kit import REPO, TOKEN, spawn_node

pytestmark = pytest.mark.timeout(120)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


@dataclass
class Netns:
    a: str
    b: str
    veth_b: str
    addr_b: str


def _unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"ckt-probe-{uuid.uuid4().hex[:6]}"
    res = ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = _unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    tag = uuid.uuid4().hex[:6]
    a, b = f"ckt-{tag}-a", f"ckt-{tag}-b"
    va, vb = f"ckv{tag}a", f"ckv{tag}b"
    net = random.randint(0, 63) * 4
    addr_a, addr_b = f"10.213.{net // 256}.{net % 256 + 1}", f"10.213.{net // 256}.{net % 256 + 2}"
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        ip("link", "set", va, "netns", a)
        ip("link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, addr_a), (b, vb, addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield Netns(a, b, vb, addr_b)
    finally:
        ip("netns", "del", a, check=False)  # deleting a namespace removes its end of the veth
        ip("netns", "del", b, check=False)


def test_partition_fails_the_push_within_its_deadline_and_replication_resumes(netns: Netns) -> None:
    server, port = spawn_node("node-b", prefix=["ip", "netns", "exec", netns.b], host=netns.addr_b)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKPTD_TEST_PEER_TOKEN": TOKEN}
    client = subprocess.Popen(["ip", "netns", "exec", netns.a, sys.executable,
                               str(REPO / "tests" / "peer" / "_partition_client.py"), f"{netns.addr_b}:{port}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    assert client.stdin is not None and client.stdout is not None

    def say(line: str) -> None:
        assert client.stdin is not None
        client.stdin.write(line + "\n")
        client.stdin.flush()

    try:
        assert client.stdout.readline().strip() == "ready"
        ip("-n", netns.b, "link", "set", netns.veth_b, "down")  # silent partition
        say("cut")
        verdict = client.stdout.readline().split()
        assert verdict[:1] == ["failed"] and verdict[1] in ("Timeout", "TierFailed"), verdict
        assert float(verdict[2]) < 3.0 + 1.0
        ip("-n", netns.b, "link", "set", netns.veth_b, "up")
        say("healed")
        resumed = client.stdout.readline().split()
        assert resumed[:1] == ["resumed"], resumed
        assert client.stdout.readline().strip() == "fetched True"
        assert client.wait(20) == 0
    finally:
        for proc in (client, server):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
