"""Peer membership from the cluster (peers.discovery = "dns:name:port", ckptd/peers/discovery.py).

The real path: three daemons on loopback, each on its own address (127.0.0.2-4) and the same
peer port, as pods behind a headless Service are. Each runs in a private mount namespace whose
/etc/hosts maps one name to the three addresses, so the daemons' own system resolver answers
the name with three A records (the machine's /etc/hosts is not touched). They find each other,
replicate a step to REPLICATED, and a SIGKILLed node leaves the membership while its address is
still in the DNS answer; they refuse the job's SetPeers. Below that test, the discovery task
with a resolver handed in, against the same kind of real daemons: a name that stops resolving
keeps the membership, an address that leaves the answer leaves at once, an address nobody
answers on never joins.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from ckptd.core.config.peers import DnsDiscovery, PeerAddr
from ckptd.peers.client import PeerClient
from ckptd.peers.discovery import MISSES_TO_DROP, PeerDiscovery, resolve_dns
from ckptd.peers.placement import Member, coordinator_for, preference, shard_key
from tests._ckptd_helpers import free_port, log_messages
from tests.conftest import DaemonProc
from tests.state_factory import vector_state

TOKEN = "test-peer-token-discovery-0123"
NAME = "ckptd-peers.test"
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _mount_ns_unavailable() -> str | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare(1) not installed"
    r = subprocess.run([unshare, "-m", "mount", "--bind", "/dev/null", "/dev/null"], capture_output=True,
                       text=True, timeout=10)
    return None if r.returncode == 0 else f"no private mount namespace: {r.stderr.strip()[:200]}"


def _config(node: str, address: str, port: int, extra: str = "") -> str:
    return (f'[peers]\nlisten = "{address}:{port}"\nnode_id = "{node}"\ntoken = "{TOKEN}"\n'
            f"replication_factor = 1\npush_timeout_s = 2.0\n{extra}")


def _wait_log(d: DaemonProc, needle: str, timeout_s: float, after: int = 0) -> str:
    """The last log message containing ``needle`` among the messages after the first ``after``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hits = [m for m in log_messages(d.log_path.read_text())[after:] if needle in m]
        if hits:
            return hits[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {needle!r} in the log within {timeout_s}s:\n{d.log_path.read_text()[-3000:]}")


def test_daemons_find_each_other_by_dns_and_drop_a_lost_node(daemon_factory: Callable[..., DaemonProc],
                                                             tmp_path: Path) -> None:
    if (why := _mount_ns_unavailable()) is not None:
        pytest.skip(why)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {NAME}\n" for a in ADDRESSES))
    ns = [str(shutil.which("unshare")), "-m", "sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$@"', "sh"]
    port = free_port()
    extra = f'discovery = "dns:{NAME}:{port}"\ndiscovery_interval_s = 1\n'
    nodes = [daemon_factory(config_text=_config(f"n{i + 1}", a, port, extra), prefix=ns)
             for i, a in enumerate(ADDRESSES)]
    want = ", ".join(f"n{i + 1}={a}:{port}" for i, a in enumerate(ADDRESSES))
    for d in nodes:
        _wait_log(d, f"peer membership discovered from {NAME}: {want}", 30)
    with grpc.insecure_channel(f"unix:{nodes[0].addr}") as ch:  # the cluster's list, not the job's
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.CheckpointServiceStub(ch).SetPeers(pb.SetPeersRequest(peers=["n1=127.0.0.9:1", "x=h:1"]),
                                                       timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "discovered" in str(refused.value.details())
    members = [Member(f"n{i + 1}") for i in range(3)]
    job = next(j for j in (f"disc{uuid.uuid4().hex[:6]}" for _ in range(1000))  # n3 holds rank 0's replica
               if coordinator_for(members, j) != "n3" and preference(members, shard_key(j, 0), "n1")[0] == "n3")
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes[0].addr) as m:
        assert m.save(1, vector_state(1, 4096)).ok
        m._wait(1, Level.REPLICATED, 60)
        before = len(log_messages(nodes[0].log_path.read_text()))
        nodes[2].kill()  # its address stays in the DNS answer: it goes after MISSES_TO_DROP silent rounds
        _wait_log(nodes[0], f"peer membership discovered from {NAME}: n1={ADDRESSES[0]}:{port}, "
                            f"n2={ADDRESSES[1]}:{port}", 30, after=before)
        assert m.save(2, vector_state(2, 4096)).ok
        m._wait(2, Level.REPLICATED, 60)  # re-placed on the surviving peer
    assert _wait_log(nodes[0], f"step {job}@2: this node's shards held by n2", 5)


def test_discovery_rounds_against_real_daemons(daemon_factory: Callable[..., DaemonProc]) -> None:
    port = free_port()
    nodes = [daemon_factory(config_text=_config(f"n{i + 1}", a, port)) for i, a in enumerate(ADDRESSES)]
    answer: list[str] | OSError = list(ADDRESSES)
    seen: list[tuple[PeerAddr, ...]] = []

    async def resolve(name: str, p: int) -> list[str]:
        assert (name, p) == (NAME, port)
        if isinstance(answer, OSError):
            raise answer
        return list(answer)

    async def rounds() -> None:
        nonlocal answer
        client = PeerClient(TOKEN, "observer", max_attempts=1)
        disc = PeerDiscovery(DnsDiscovery(NAME, port), client, 1.0, seen.append, resolve)
        try:
            assert await disc.refresh()
            assert [(m.node_id, m.target) for m in seen[-1]] == [(f"n{i + 1}", f"{a}:{port}")
                                                                 for i, a in enumerate(ADDRESSES)]
            assert not await disc.refresh()  # unchanged: nobody is told again
            answer = OSError("name resolution failed")
            assert not await disc.refresh() and len(seen) == 1  # a DNS outage keeps the membership
            answer = [ADDRESSES[0], ADDRESSES[2]]
            assert await disc.refresh()
            assert [m.node_id for m in seen[-1]] == ["n1", "n3"]  # left the answer: gone at once
            answer = [ADDRESSES[0], ADDRESSES[2], "127.0.0.1"]  # nobody listens there: never a member
            assert not await disc.refresh()
            nodes[2].kill()
            for _ in range(MISSES_TO_DROP - 1):  # a silent member is kept for a while
                assert not await disc.refresh()
            assert await disc.refresh()
            assert [m.node_id for m in seen[-1]] == ["n1"]
        finally:
            await client.close()

    async def few_pings() -> None:  # known members are re-checked a few a round, in turn
        nonlocal answer
        answer = list(ADDRESSES[:2])
        client = PeerClient(TOKEN, "observer", max_attempts=1)
        disc = PeerDiscovery(DnsDiscovery(NAME, port), client, 1.0, seen.append, resolve, verify_per_round=1)
        try:
            assert await disc.refresh() and disc.pings == 2  # both new: both asked
            assert not await disc.refresh() and disc.pings == 3  # known: one of them re-checked
            nodes[1].kill()
            for _ in range(2 * MISSES_TO_DROP - 2):  # n2 is checked every other round, from the next
                assert not await disc.refresh()
            assert await disc.refresh() and [m.node_id for m in seen[-1]] == ["n1"]
            assert disc.pings == 2 + 2 * MISSES_TO_DROP  # one a round after the first
        finally:
            await client.close()

    asyncio.run(rounds())
    asyncio.run(few_pings())
    assert "127.0.0.1" in asyncio.run(resolve_dns("localhost", port))  # the system resolver, for real
