"""Helpers of the peer tests: shard headers over given bytes, in-process peer nodes, a child node.

``PeerNode`` is a PeerServer with a MemoryReplicaStore and a ReadinessBoard on 127.0.0.1 (port
picked by the kernel) inside the test's event loop; ``spawn_node`` starts the same in a child
process (tests/peer/_node.py) and returns its port, so tests can SIGSTOP or kill it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from ckptd.core.config.peers import TlsFiles
from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import ReplicaHeader, ShardEntry
from ckptd.peers.client import PeerClient
from ckptd.peers.placement import ReadinessBoard
from ckptd.peers.server import PeerServer, RunningPeerServer, start_peer_server
from tests.peer.memory_store import MemoryReplicaStore

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-peer-token-0123456789abcdef"
MIB = 2**20


def make_header(data: bytes | bytearray | memoryview, job: str = "job", step: int = 1, rank: int = 0,
                world_size: int = 2, chunk_bytes: int = MIB, source: str = "node-a",
                node_ranks: Sequence[int] = ()) -> ReplicaHeader:
    n = len(data)
    entry = ShardEntry(rank, n, chunk_bytes, tuple(chunk_crcs(data, chunk_bytes)),
                       (TensorEntry("w", "uint8", (n,), 0, n),), {"d": [["w", {"a": 0}]]})
    return ReplicaHeader(job, step, world_size, entry, source, tuple(node_ranks), 1700000000.5,
                         {"lr": 0.1, "note": "x"})


@dataclass
class PeerNode:
    node_id: str
    store: MemoryReplicaStore
    board: ReadinessBoard
    running: RunningPeerServer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


@asynccontextmanager
async def peer_node(node_id: str = "node-b", token: str = TOKEN, budget_bytes: int | None = None,
                    tls: TlsFiles | None = None, idle_timeout_s: float = 30.0,
                    chunk_bytes: int = 4 * MIB) -> AsyncIterator[PeerNode]:
    store = MemoryReplicaStore(node_id, budget_bytes)
    board = ReadinessBoard(node_id)
    servicer = PeerServer(node_id, store, store, store.holdings, board.report, failure_domain="rack-1",
                          idle_timeout_s=idle_timeout_s, chunk_bytes=chunk_bytes)
    running = await start_peer_server(servicer, "127.0.0.1:0", token, tls)
    try:
        yield PeerNode(node_id, store, board, running)
    finally:
        await running.stop(0)


@asynccontextmanager
async def peer_client(token: str = TOKEN, **kw: object) -> AsyncIterator[PeerClient]:
    client = PeerClient(token, "node-a", **kw)  # type: ignore[arg-type]
    try:
        yield client
    finally:
        await client.close()


def spawn_node(node_id: str, prefix: Sequence[str] = (), host: str = "127.0.0.1",
               extra: Sequence[str] = ()) -> tuple[subprocess.Popen[str], int]:
    """Start tests/peer/_node.py in a child (optionally under a prefix such as `ip netns exec X`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKPTD_TEST_PEER_TOKEN": TOKEN}
    proc = subprocess.Popen([*prefix, sys.executable, str(REPO / "tests" / "peer" / "_node.py"),
                             "--node-id", node_id, "--host", host, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"peer node did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, int(line)


def wait_dead(proc: subprocess.Popen[str], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
