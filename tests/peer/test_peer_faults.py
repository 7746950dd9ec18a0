"""A stopped, dead or silent peer never holds a push past its deadline, and replication resumes
when the peer comes back. Peers run in child processes (tests/peer/_node.py) so they can be
SIGSTOPped and SIGKILLed; the pusher is this process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time

import pytest

from ckptd.core.config.peers import PeerAddr
from ckptd.core.errors import TierFailed, Timeout
from ckptd.peers.replicator import push_to_ring
from tests.peer._kit import MIB, make_header, peer_client

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "grpc"])
def test_stopped_peer_fails_the_push_within_its_deadline_then_resumes(
        node: tuple[subprocess.Popen[str], int], bulk: bool) -> None:
    proc, port = node
    target = f"127.0.0.1:{port}"
    data = os.urandom(16 * MIB)

    async def main() -> None:
        async with peer_client(bulk=bulk) as c:
            await c.push(target, make_header(data, step=1), memoryview(data), 10)
            os.kill(proc.pid, signal.SIGSTOP)
            for step in (2, 3):  # a fresh call, and one on the now-stuck connection
                t0 = time.monotonic()
                with pytest.raises((Timeout, TierFailed)):
                    await c.push(target, make_header(data, step=step), memoryview(data), 1.5)
                assert time.monotonic() - t0 < 1.5 + 1.0
            os.kill(proc.pid, signal.SIGCONT)
            r = await c.push(target, make_header(data, step=4), memoryview(data), 15)
            assert r.nbytes == len(data) and not r.already_held
            dst = bytearray(len(data))
            await c.fetch_into(target, "job", 4, 0, memoryview(dst), 10)
            assert bytes(dst) == data
    asyncio.run(main())


def test_peer_stopped_in_the_middle_of_a_large_push(node: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = node
    data = bytearray(384 * MIB)  # long enough to be mid-transfer when the peer stops
    data[::4096] = os.urandom(len(data) // 4096)

    async def main() -> None:
        async with peer_client() as c:
            async def stop_soon() -> None:
                await asyncio.sleep(0.02)
                os.kill(proc.pid, signal.SIGSTOP)
            stopper = asyncio.create_task(stop_soon())
            t0 = time.monotonic()
            with pytest.raises((Timeout, TierFailed)):
                await c.push(f"127.0.0.1:{port}", make_header(data, chunk_bytes=16 * MIB), memoryview(data), 2.0)
            assert time.monotonic() - t0 < 3.0
            await stopper
    asyncio.run(main())


def test_dead_and_silent_peers_fail_fast_and_the_ring_moves_on(node: tuple[subprocess.Popen[str], int]) -> None:
    _, good_port = node
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never speaks HTTP/2
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    data = os.urandom(MIB)

    async def main() -> None:
        async with peer_client(max_attempts=3) as c:
            t0 = time.monotonic()
            with pytest.raises(TierFailed, match="3 attempt"):
                await c.push(f"127.0.0.1:{dead.getsockname()[1]}", make_header(data), memoryview(data), 5)
            assert time.monotonic() - t0 < 3
            t0 = time.monotonic()
            with pytest.raises((Timeout, TierFailed)):  # no SETTINGS frame ever comes
                await c.push(f"127.0.0.1:{silent.getsockname()[1]}", make_header(data), memoryview(data), 1)
            assert time.monotonic() - t0 < 2
            cands = [PeerAddr("silent", "127.0.0.1", silent.getsockname()[1]),
                     PeerAddr("node-b", "127.0.0.1", good_port)]
            out = await push_to_ring(c, cands, 1, make_header(data, step=2), memoryview(data), 10, push_timeout_s=1)
            assert list(out.holders) == ["node-b"]
            assert out.failures["silent"].startswith(("Timeout", "TierFailed"))
    asyncio.run(main())
    silent.close()
    dead.close()


def test_a_peer_that_restarts_is_pushed_to_on_the_very_next_call() -> None:
    """A transport failure retires the peer's channel: with one attempt per push, the first push
    after the peer is back succeeds, instead of failing while grpc waits out its reconnect backoff."""
    from ckptd.peers.placement import ReadinessBoard
    from ckptd.peers.server import PeerServer, RunningPeerServer, start_peer_server
    from tests.peer._kit import TOKEN
    from tests.peer.memory_store import MemoryReplicaStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    data = os.urandom(MIB)

    async def serve() -> RunningPeerServer:
        store = MemoryReplicaStore("node-b", None)
        board = ReadinessBoard("node-b")
        servicer = PeerServer("node-b", store, store, store.holdings, board.report)
        return await start_peer_server(servicer, target, TOKEN, None)

    async def main() -> None:
        async with peer_client(max_attempts=1) as c:
            running = await serve()
            await c.push(target, make_header(data, step=1), memoryview(data), 5)
            await running.stop(0)
            for step in (2, 3, 4):  # each failure would grow grpc's reconnect backoff
                with pytest.raises(TierFailed):
                    await c.push(target, make_header(data, step=step), memoryview(data), 5)
            running = await serve()
            try:
                r = await c.push(target, make_header(data, step=5), memoryview(data), 5)
                assert r.nbytes == len(data) and not r.already_held
            finally:
                await running.stop(0)
    asyncio.run(main())
