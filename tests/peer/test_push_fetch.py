"""PeerServer + PeerClient end to end on 127.0.0.1 (real grpc.aio servers in this process):
bit-exact push and fetch over both data paths (20 MiB with integrity chunks straddling transfer
chunks, empty and tiny shards, a source without a memory view, IPv4 and IPv6 dialers of a dual
stack listener; a repeated push sends nothing), holdings, readiness, fallback along the ring.
Integrity and shape checks that keep nothing, typed errors and authentication of every RPC:
tests/peer/test_peer_refusals.py."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from ckptd.core.config.peers import PeerAddr
from ckptd.core.errors import TierFailed
from ckptd.core.manifest import ReplicaHeader
from ckptd.peers.replicator import push_to_ring
from ckptd.peers.server import PeerServer, start_peer_server
from ckptd.peers.types import OpenShard, ReadyReport
from tests.peer._kit import MIB, TOKEN, make_header, peer_client, peer_node
from tests.peer._push_fetch_kit import BOTH_PATHS, payload, run
from tests.peer.memory_store import MemoryReplicaStore

pytestmark = pytest.mark.timeout(90)


@BOTH_PATHS
def test_push_then_fetch_bit_exact_20mib(bulk: bool) -> None:
    data = os.urandom(20 * MIB)
    h = make_header(data, chunk_bytes=3 * MIB + 4096)  # integrity chunks straddle transfer chunks

    async def main() -> None:
        async with peer_node() as node, peer_client(bulk=bulk) as c:
            r = await c.push(node.target, h, memoryview(data), 20)
            assert (r.node_id, r.nbytes, r.already_held, r.tiers) == ("node-b", len(data), False, ("memory",))
            assert node.store.get("job", 1, 0) == data
            assert node.store.reserved_bytes == 0 and not node.store.aborted
            dst = bytearray(len(data) + 100)
            f = await c.fetch_into(node.target, "job", 1, 0, memoryview(dst), 20)
            assert bytes(dst[: len(data)]) == data and f.tier == "memory" and f.header == h
            # a destination made from the header (how the daemon leases a slot of the right size)
            made: list[ReplicaHeader] = []

            async def lease(header: ReplicaHeader) -> memoryview:
                made.append(header)
                return memoryview(bytearray(header.nbytes))
            f2 = await c.fetch_into(node.target, "job", 1, 0, lease, 20)
            assert made == [h] and f2.header.entry.chunk_crc32c == h.entry.chunk_crc32c
            # pushing the same bytes again sends nothing
            again = await c.push(node.target, h, memoryview(data), 20)
            assert again.already_held and node.running.servicer.received_bytes == len(data)
    run(main())


def test_empty_and_tiny_shards() -> None:
    async def main() -> None:
        async with peer_node() as node, peer_client() as c:
            for i, data in enumerate([b"", b"x", os.urandom(4097)]):
                h = make_header(data, step=i, chunk_bytes=4096)
                await c.push(node.target, h, memoryview(data), 10)
                dst = bytearray(len(data))
                await c.fetch_into(node.target, "job", i, 0, memoryview(dst), 10)
                assert bytes(dst) == data
    run(main())


def test_holdings_and_readiness() -> None:
    async def main() -> None:
        async with peer_node() as node, peer_client() as c:
            for job, step, rank in [("j1", 1, 0), ("j1", 1, 1), ("j2", 5, 0)]:
                d = payload(1000, seed=rank)
                await c.push(node.target, make_header(d, job=job, step=step, rank=rank), memoryview(d), 10)
            node.store.mark_complete("j1", 1)
            held = await c.list_holdings(node.target, "j1")
            assert [(h.job, h.step, h.rank, h.nbytes, h.tiers, h.step_complete, h.source_node) for h in held] == [
                ("j1", 1, 0, 1000, ("memory",), True, "node-a"), ("j1", 1, 1, 1000, ("memory",), True, "node-a")]
            assert len(await c.list_holdings(node.target)) == 3
            st = await c.report_ready(node.target, ReadyReport("j1", 1, 4, "peer", "node-a", (0, 1)))
            assert st.ready_ranks == (0, 1) and not st.complete and st.coordinator_node == "node-b"
            waiter = asyncio.create_task(node.board.wait_complete("j1", 1, "peer", 10))
            st = await c.report_ready(node.target, ReadyReport("j1", 1, 4, "peer", "node-c", (2, 3)))
            assert st.complete and (await waiter).complete
            assert node.board.newest_complete("j1", "peer") == 1
            await c.report_ready(node.target, ReadyReport("j1", 2, 4, "disk", "node-c", (3,), True, "EIO"))
            with pytest.raises(TierFailed, match="rank 3: node-c: EIO"):
                await node.board.wait_complete("j1", 2, "disk", 10)
            info = await c.ping(node.target)
            assert (info.node_id, info.failure_domain) == ("node-b", "rack-1") and info.rtt_s > 0
    run(main())


def test_push_to_ring_moves_past_dead_and_full_peers() -> None:
    data = payload(MIB)
    h = make_header(data)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    dead_port = dead.getsockname()[1]

    async def main() -> None:
        async with peer_node("node-b") as b, peer_node("node-c", budget_bytes=1000) as full, \
                peer_node("node-d") as d, peer_client(max_attempts=2) as c:
            cands = [PeerAddr("node-x", "127.0.0.1", dead_port), PeerAddr("node-c", "127.0.0.1", full.running.port),
                     PeerAddr("node-b", "127.0.0.1", b.running.port), PeerAddr("node-d", "127.0.0.1", d.running.port)]
            out = await push_to_ring(c, cands, 2, h, memoryview(data), deadline_s=20, push_timeout_s=5)
            assert sorted(out.holders) == ["node-b", "node-d"] and not out.degraded
            assert all(r.node_id == n and r.nbytes == len(data) for n, r in out.holders.items())
            assert set(out.failures) == {"node-x", "node-c"}
            assert out.failures["node-x"].startswith("TierFailed") and "BudgetExhausted" in out.failures["node-c"]
            assert b.store.get("job", 1, 0) == data == d.store.get("job", 1, 0)
            short = await push_to_ring(c, cands[:2], 1, make_header(data, step=2), memoryview(data), 10)
            assert short.degraded and not short.holders
    run(main())
    dead.close()


@BOTH_PATHS
def test_fetch_from_a_source_without_a_memory_view(bulk: bool) -> None:
    """Disk-resident copies are read chunk by chunk through OpenShard.read (no view)."""
    data = payload(5 * MIB + 3)

    class DiskLike:
        def __init__(self, store: MemoryReplicaStore) -> None:
            self.store = store
            self.reads: list[tuple[int, int]] = []

        async def open_shard(self, job: str, step: int, rank: int) -> OpenShard:
            inner = await self.store.open_shard(job, step, rank)

            async def read(off: int, n: int) -> bytes:
                self.reads.append((off, n))
                return bytes(await inner.read(off, n))
            return OpenShard(inner.header, "disk", read, inner.release)

    async def main() -> None:
        store = MemoryReplicaStore("node-d")
        store.add_local(make_header(data, chunk_bytes=2 * MIB), data)
        source = DiskLike(store)
        running = await start_peer_server(PeerServer("node-d", store, source, store.holdings), "127.0.0.1:0", TOKEN)
        try:
            async with peer_client(bulk=bulk) as c:
                dst = bytearray(len(data))
                f = await c.fetch_into(f"127.0.0.1:{running.port}", "job", 1, 0, memoryview(dst), 10)
                assert bytes(dst) == data and f.tier == "disk"
                assert source.reads and store.shards[("job", 1, 0)].pins == 0
        finally:
            await running.stop(0)
    run(main())


def test_dual_stack_listen_serves_ipv4_and_ipv6_dialers() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    data = payload(3 * MIB)

    async def main() -> None:
        store = MemoryReplicaStore("node-6")
        running = await start_peer_server(PeerServer("node-6", store, store, store.holdings), "[::]:0", TOKEN)
        try:
            async with peer_client() as c:
                for step, target in enumerate((f"127.0.0.1:{running.port}", f"[::1]:{running.port}")):
                    await c.push(target, make_header(data, step=step), memoryview(data), 10)
                    dst = bytearray(len(data))
                    await c.fetch_into(target, "job", step, 0, memoryview(dst), 10)
                    assert bytes(dst) == data
        finally:
            await running.stop(0)
    run(main())
