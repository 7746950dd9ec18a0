"""The restore's peer survey asks a rank's placement candidates, not every member, once the
membership is large (ckptd/restore/sources/peer.py): real PeerServers over gRPC, a real
PeerDirectory and client, and the ListHoldings each server answers counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from ckptd.core.config.peers import PeerAddr
from ckptd.memory.catalog import Catalog
from ckptd.peers.client import PeerClient
from ckptd.peers.placement import ReadinessBoard
from ckptd.peers.replicator import PeerDirectory
from ckptd.peers.server import PeerServer, RunningPeerServer, start_peer_server
from ckptd.peers.types import Holding
from ckptd.restore.sources.peer import SPARE_CANDIDATES, PeerSource
from tests.peer._kit import TOKEN, make_header
from tests.peer.memory_store import MemoryReplicaStore

NODES = [f"n{i}" for i in range(10)]


@asynccontextmanager
async def cluster() -> AsyncIterator[tuple[dict[str, MemoryReplicaStore], dict[str, int], dict[str, int]]]:
    """Ten peer servers; (stores, ports, ListHoldings answered per node)."""
    stores = {n: MemoryReplicaStore(n) for n in NODES}
    asked = dict.fromkeys(NODES, 0)
    ports: dict[str, int] = {}
    async with AsyncExitStack() as stack:
        for n in NODES:
            async def holdings(job: str = "", n: str = n) -> list[Holding]:
                asked[n] += 1
                return await stores[n].holdings(job)
            srv = PeerServer(n, stores[n], stores[n], holdings, ReadinessBoard(n).report)
            running: RunningPeerServer = await start_peer_server(srv, "127.0.0.1:0", TOKEN)
            stack.push_async_callback(running.stop, 0)
            ports[n] = running.port
        yield stores, ports, asked


def test_a_large_membership_is_surveyed_at_the_rank_candidates_first() -> None:
    async def main() -> None:
        async with cluster() as (stores, ports, asked):
            client = PeerClient(TOKEN, "n0", max_attempts=1)
            members = tuple(PeerAddr(n, "127.0.0.1", ports[n]) for n in NODES)
            directory = PeerDirectory("n0", members, client, 1, 5.0, 5.0)
            try:
                order = [p.node_id for p in directory.order("job", 0, "n0")]
                data = b"x" * 4096
                holder = order[0]  # where n0's replica of rank 0 went (k = 1)
                await client.push(f"127.0.0.1:{ports[holder]}", make_header(data, "job", 3, 0, 1, source="n0",
                                                                           node_ranks=(0,)), memoryview(data), 10)
                stores[holder].mark_complete("job", 3)
                survey = await PeerSource(lambda: directory, Catalog(), ask_all_up_to=4).survey("job", 0)
                assert set(survey.steps) == {3} and [c.key for c in survey.copies[3]] == [holder]
                first = set(order[:1 + 1 + SPARE_CANDIDATES])
                assert {n for n, a in asked.items() if a} == first  # 6 of 9 peers asked, not all
                for n in asked:
                    asked[n] = 0
                survey = await PeerSource(lambda: directory, Catalog(), ask_all_up_to=4).survey("job", 1)
                assert not survey.steps  # nobody holds rank 1: after the candidates, everyone was asked
                assert all(asked[n] >= 1 for n in NODES if n != "n0")
                for n in asked:
                    asked[n] = 0
                await PeerSource(lambda: directory, Catalog()).survey("job", 0)  # a small membership: everyone
                assert all(asked[n] == 1 for n in NODES if n != "n0")
            finally:
                await client.close()
    asyncio.run(main())
