"""A peer node in its own process: PeerServer + MemoryReplicaStore + ReadinessBoard on --host:0.

Prints the bound port on its first stdout line, then serves until killed. The token comes from
CKPTD_TEST_PEER_TOKEN. Used by the tests that stop, kill or partition a peer.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from ckptd.peers.placement import ReadinessBoard
from ckptd.peers.server import PeerServer, start_peer_server
from tests.peer.memory_store import MemoryReplicaStore


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ns = ap.parse_args()
    store = MemoryReplicaStore(ns.node_id)
    board = ReadinessBoard(ns.node_id)
    servicer = PeerServer(ns.node_id, store, store, store.holdings, board.report)
    running = await start_peer_server(servicer, f"{ns.host}:{ns.port}", os.environ["CKPTD_TEST_PEER_TOKEN"])
    print(running.port, flush=True)
    await running.server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
