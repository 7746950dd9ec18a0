"""Ranged FetchShard between a PeerServer and a PeerClient on 127.0.0.1 (real grpc.aio, in process).

4 KiB integrity chunks sent as 1000-byte transfer chunks: a fetch with byte ranges writes and
verifies only the chunks covering them (the rest of the destination is untouched) and the server
sends only those bytes; a damaged chunk outside the ranges passes, one inside is IntegrityError
naming it; a range outside the shard is InvalidArgument; a peer that ignores the ranges (one that
predates the field) sends the whole shard, which the client then verifies whole; a peer that
answers a whole-shard fetch with chunks only is refused (the rest would be handed out unsent).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.errors import IntegrityError, InvalidArgument
from ckptd.peers.server import PeerServer, start_peer_server
from tests.peer._kit import TOKEN, make_header, peer_client, peer_node
from tests.peer._push_fetch_kit import run
from tests.peer.memory_store import MemoryReplicaStore

pytestmark = pytest.mark.timeout(60)
CHUNK = 4096
DATA = os.urandom(10 * CHUNK + 123)  # 11 chunks, the last short
RANGES = [(CHUNK + 5, 10), (3 * CHUNK + 100, 200), (10 * CHUNK + 1, 4)]  # chunks 1, 3 and the short 10


def test_a_ranged_fetch_sends_and_verifies_only_the_covering_chunks() -> None:
    h = make_header(DATA, chunk_bytes=CHUNK)

    async def main() -> None:
        async with peer_node(chunk_bytes=1000) as node, peer_client() as c:
            node.store.add_local(h, DATA)
            dst = bytearray(b"\xaa" * len(DATA))
            await c.fetch_into(node.target, "job", 1, 0, memoryview(dst), 10, ranges=RANGES)
            for i in range(11):
                span = slice(i * CHUNK, min((i + 1) * CHUNK, len(DATA)))
                if i in (1, 3, 10):
                    assert dst[span] == DATA[span], i
                else:
                    assert dst[span] == b"\xaa" * (span.stop - span.start), i  # never written
            assert node.running.servicer.served_bytes == 2 * CHUNK + 123

            node.store.shards[h.key].data[5 * CHUNK + 9] ^= 0xFF  # chunk 5 damaged at the holder
            await c.fetch_into(node.target, "job", 1, 0, memoryview(dst), 10, ranges=RANGES)  # not needed
            with pytest.raises(IntegrityError, match="crc32c mismatch in chunk 5"):
                await c.fetch_into(node.target, "job", 1, 0, memoryview(dst), 10, ranges=[(5 * CHUNK, 1)])
            with pytest.raises(InvalidArgument, match="outside the shard"):
                await c.fetch_into(node.target, "job", 1, 0, memoryview(dst), 10, ranges=[(len(DATA) - 2, 4)])
    run(main())


class OldPeer(PeerServer):
    """A peer that predates FetchShardRequest.ranges: it never reads the field."""

    async def FetchShard(self, request: ppb.FetchShardRequest, context: Any) -> None:
        request.ClearField("ranges")
        await super().FetchShard(request, context)


class PartPeer(PeerServer):
    """A peer that sends one chunk, whatever it was asked for."""

    async def FetchShard(self, request: ppb.FetchShardRequest, context: Any) -> None:
        request.ranges.add(offset=0, length=1)
        await super().FetchShard(request, context)


def test_a_peer_that_ignores_the_ranges_sends_the_whole_shard_verified_whole() -> None:
    h = make_header(DATA, chunk_bytes=CHUNK)

    async def main() -> None:
        store = MemoryReplicaStore("node-old")
        store.add_local(h, DATA)
        running = await start_peer_server(OldPeer("node-old", store, store, store.holdings, chunk_bytes=1000),
                                          "127.0.0.1:0", TOKEN)
        part = await start_peer_server(PartPeer("node-part", store, store, store.holdings), "127.0.0.1:0", TOKEN)
        try:
            async with peer_client() as c:
                with pytest.raises(IntegrityError, match="chunks only, in answer to a whole-shard fetch"):
                    await c.fetch_into(f"127.0.0.1:{part.port}", "job", 1, 0, memoryview(bytearray(len(DATA))), 10)
                dst = bytearray(len(DATA))
                await c.fetch_into(f"127.0.0.1:{running.port}", "job", 1, 0, memoryview(dst), 10, ranges=RANGES)
                assert bytes(dst) == DATA and running.servicer.served_bytes == len(DATA)
                store.shards[h.key].data[5 * CHUNK] ^= 0xFF  # outside the ranges, but sent: refused
                with pytest.raises(IntegrityError):
                    await c.fetch_into(f"127.0.0.1:{running.port}", "job", 1, 0, memoryview(dst), 10,
                                       ranges=RANGES)
        finally:
            await running.stop(0)
            await part.stop(0)
    run(main())
