"""PeerServer + PeerClient on 127.0.0.1 (real grpc.aio servers in this process): what a peer refuses.

Integrity and shape checks that keep nothing (a corrupted chunk or bulk frame in transit, a
malformed stream, a held copy or a source copy that no longer matches its checksums: DATA_LOSS or
INVALID_ARGUMENT, IntegrityError to the caller, nothing stored or reserved), typed errors (budget,
conflict, not found, a readiness world size mismatch), authentication of every RPC (a missing or
wrong token changes nothing), and a silent sender dropped after the idle timeout. Bit-exact push
and fetch: tests/peer/test_push_fetch.py."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.errors import (
    AlreadyExists,
    BudgetExhausted,
    FailedPrecondition,
    IntegrityError,
    NotFound,
    Unauthenticated,
)
from ckptd.core.integrity import crc32c
from ckptd.peers.bulk import FRAME_HEAD, MAGIC
from ckptd.peers.client import PeerClient
from ckptd.peers.types import ReadyReport
from ckptd.peers.wire import (
    ACCEPT_METADATA_KEY,
    BULK_METADATA_KEY,
    SERVICE,
    RawChunk,
    decode_fetch_response,
    encode_stream_message,
    header_to_pb,
)
from tests.peer._kit import MIB, TOKEN, PeerNode, make_header, peer_client, peer_node
from tests.peer._push_fetch_kit import BOTH_PATHS, payload, run

pytestmark = pytest.mark.timeout(90)


async def raw_push(node: PeerNode, messages: list[Any], token: str = TOKEN) -> grpc.aio.AioRpcError:
    """Send hand-made PushReplica messages; return the error the server answered with."""
    async with grpc.aio.insecure_channel(node.target) as ch:
        method = ch.stream_unary(f"/{SERVICE}/PushReplica", request_serializer=encode_stream_message,
                                 response_deserializer=ppb.PushReplicaResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(iter(messages), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    return info.value


def error_type(err: grpc.aio.AioRpcError) -> str:
    pairs: Any = err.trailing_metadata() or ()
    return str(dict(pairs).get("ckptd-error", ""))


def test_corrupted_chunk_in_transit_is_data_loss_and_nothing_is_stored() -> None:
    data = payload(6 * MIB)
    h = make_header(data)
    head = ppb.PushReplicaRequest(header=header_to_pb(h))

    async def main() -> None:
        async with peer_node() as node:
            good = RawChunk(0, data[: 4 * MIB], crc32c(data[: 4 * MIB]))
            bad = RawChunk(4 * MIB, data[4 * MIB :], crc32c(data[4 * MIB :]) ^ 0x1)
            err = await raw_push(node, [head, good, bad])
            assert err.code() == grpc.StatusCode.DATA_LOSS and error_type(err) == "IntegrityError"
            # flipped bits with a matching chunk crc: the shard's checksum list catches it
            flipped = bytearray(data[4 * MIB :])
            flipped[5] ^= 0x40
            err = await raw_push(node, [head, good, RawChunk(4 * MIB, bytes(flipped), crc32c(flipped))])
            assert err.code() == grpc.StatusCode.DATA_LOSS and "integrity chunk" in (err.details() or "")
            assert node.store.shards == {} and node.store.reserved_bytes == 0
            assert len(node.store.aborted) == 2
    run(main())


def test_corrupted_bulk_frame_is_data_loss_and_nothing_is_stored() -> None:
    data = payload(3 * MIB)
    h = make_header(data)

    async def main() -> None:
        async with peer_node() as node, grpc.aio.insecure_channel(node.target) as ch:
            method = ch.stream_unary(f"/{SERVICE}/PushReplica", request_serializer=encode_stream_message,
                                     response_deserializer=ppb.PushReplicaResponse.FromString)
            call = method(None, metadata=(("ckptd-peer-token", TOKEN),), timeout=10)
            await call.write(ppb.PushReplicaRequest(header=header_to_pb(h), want_bulk=True))
            md: dict[str, Any] = dict(await call.initial_metadata())
            assert md[ACCEPT_METADATA_KEY] == "accept"
            ticket = ppb.BulkTicket.FromString(md[BULK_METADATA_KEY])

            def send_bad_frames() -> None:
                with socket.create_connection(("127.0.0.1", ticket.port), timeout=10) as s:
                    s.sendall(MAGIC + ticket.ticket)
                    s.sendall(FRAME_HEAD.pack(0, MIB, h.entry.chunk_crc32c[0]))
                    s.sendall(data[:MIB])
                    s.sendall(FRAME_HEAD.pack(MIB, MIB, h.entry.chunk_crc32c[1] ^ 1))
                    s.sendall(data[MIB : 2 * MIB])
            await asyncio.to_thread(send_bad_frames)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.DATA_LOSS
            assert node.store.shards == {} and node.store.reserved_bytes == 0

            def stranger() -> bytes:  # a made-up ticket is refused without touching anything
                with socket.create_connection(("127.0.0.1", ticket.port), timeout=10) as s:
                    s.sendall(MAGIC + os.urandom(16))
                    return s.recv(1)
            assert await asyncio.to_thread(stranger) == b""
    run(main())


def test_malformed_streams_are_invalid_argument_and_keep_nothing() -> None:
    data = payload(2 * MIB)
    h = make_header(data)
    head = ppb.PushReplicaRequest(header=header_to_pb(h))
    c0 = RawChunk(0, data[:MIB], crc32c(data[:MIB]))
    c1 = RawChunk(MIB, data[MIB:], crc32c(data[MIB:]))
    bad_header = header_to_pb(h)
    bad_header.job = "../etc"

    async def main() -> None:
        async with peer_node() as node:
            cases: dict[str, list[Any]] = {
                "chunk first": [c0, head],
                "out of order": [head, c1, c0],
                "short": [head, c0],
                "second header": [head, c0, head],
                "bad header": [ppb.PushReplicaRequest(header=bad_header)],
                "empty": [],
                "oversized chunk": [head, RawChunk(0, data + data[:MIB * 3], 0)],
            }
            for name, msgs in cases.items():
                err = await raw_push(node, msgs)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
            assert node.store.shards == {} and node.store.reserved_bytes == 0
    run(main())


def test_typed_errors_budget_conflict_not_found() -> None:
    data = payload(2 * MIB)

    async def main() -> None:
        async with peer_node(budget_bytes=3 * MIB) as node, peer_client() as c:
            await c.push(node.target, make_header(data, step=1), memoryview(data), 10)
            with pytest.raises(BudgetExhausted, match="no room"):
                await c.push(node.target, make_header(data, step=2), memoryview(data), 10)
            other = payload(2 * MIB, seed=7)
            with pytest.raises(AlreadyExists, match="other bytes"):
                await c.push(node.target, make_header(other, step=1), memoryview(other), 10)
            with pytest.raises(NotFound, match="no copy"):
                await c.fetch_into(node.target, "job", 9, 0, memoryview(bytearray(10)), 10)
            await c.report_ready(node.target, ReadyReport("job", 1, 2, "memory", "a", (0,)))
            with pytest.raises(FailedPrecondition):  # world_size mismatch on the coordinator
                await c.report_ready(node.target, ReadyReport("job", 1, 3, "memory", "a", (1,)))
    run(main())


@BOTH_PATHS
def test_fetch_of_a_corrupt_held_copy_is_an_integrity_error(bulk: bool) -> None:
    data = payload(5 * MIB)

    async def main() -> None:
        async with peer_node() as node, peer_client(bulk=bulk) as c:
            await c.push(node.target, make_header(data), memoryview(data), 10)
            node.store.shards[("job", 1, 0)].data[3 * MIB + 17] ^= 0x01  # bit rot in the peer's RAM
            with pytest.raises(IntegrityError, match="127.0.0.1"):
                await c.fetch_into(node.target, "job", 1, 0, memoryview(bytearray(len(data))), 10)
    run(main())


RPCS: dict[str, Callable[[PeerClient, str], Awaitable[object]]] = {
    "Ping": lambda c, t: c.ping(t),
    "ListHoldings": lambda c, t: c.list_holdings(t),
    "ReportReady": lambda c, t: c.report_ready(t, ReadyReport("job", 1, 1, "memory", "node-a", (0,))),
    "FetchShard": lambda c, t: c.fetch_into(t, "job", 1, 0, memoryview(bytearray(MIB)), 5),
    "PushReplica": lambda c, t: c.push(t, make_header(b"z" * 1000, step=2), memoryview(b"z" * 1000), 5),
}


@pytest.mark.parametrize("token", ["", "wrong-token-of-enough-length"], ids=["missing", "wrong"])
def test_every_rpc_refuses_a_missing_or_wrong_token(token: str) -> None:
    data = payload(MIB)

    async def main() -> None:
        async with peer_node() as node, peer_client() as good:
            await good.push(node.target, make_header(data), memoryview(data), 10)
            before = (dict(node.store.shards), list(node.store.aborted))
            bad = PeerClient(token, "node-a", max_attempts=1)
            if not token:
                bad._md = ()  # no metadata at all
            try:
                for call in RPCS.values():
                    with pytest.raises(Unauthenticated):
                        await call(bad, node.target)
            finally:
                await bad.close()
            assert (dict(node.store.shards), list(node.store.aborted)) == before
            with pytest.raises(NotFound):
                node.board.state("job", 1, "memory")  # ReportReady never ran
            err = await raw_push(node, [], token=token or "x")
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            async with grpc.aio.insecure_channel(node.target) as ch:
                m = ch.unary_stream(f"/{SERVICE}/FetchShard",
                                    request_serializer=ppb.FetchShardRequest.SerializeToString,
                                    response_deserializer=decode_fetch_response)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in m(ppb.FetchShardRequest(job="job", step=1, rank=0), timeout=5):
                        pass
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    run(main())


def test_a_silent_sender_is_dropped_after_the_idle_timeout() -> None:
    data = payload(2 * MIB)
    h = make_header(data)

    async def main() -> None:
        async with peer_node(idle_timeout_s=0.5) as node, grpc.aio.insecure_channel(node.target) as ch:
            method = ch.stream_unary(f"/{SERVICE}/PushReplica", request_serializer=encode_stream_message,
                                     response_deserializer=ppb.PushReplicaResponse.FromString)
            call = method(None, metadata=(("ckptd-peer-token", TOKEN),), timeout=10)
            await call.write(ppb.PushReplicaRequest(header=header_to_pb(h)))
            await call.write(RawChunk(0, data[:MIB], crc32c(data[:MIB])))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call  # never finishes writing
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert node.store.reserved_bytes == 0 and node.store.shards == {}
            # the same for a bulk sender that never connects
            call = method(None, metadata=(("ckptd-peer-token", TOKEN),), timeout=20)
            await call.write(ppb.PushReplicaRequest(header=header_to_pb(h), want_bulk=True))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert node.store.reserved_bytes == 0 and node.store.shards == {}
    run(main())


@BOTH_PATHS
def test_a_source_copy_that_no_longer_matches_its_checksums_is_refused(bulk: bool) -> None:
    """The sender's slot rotted after staging: the receiver checks the shard's crc32c list and
    refuses (DATA_LOSS); the pusher sees IntegrityError, not a broken pipe."""
    data = bytearray(payload(6 * MIB))
    h = make_header(data)
    data[5 * MIB] ^= 0x10

    async def main() -> None:
        async with peer_node() as node, peer_client(bulk=bulk, max_attempts=1) as c:
            with pytest.raises(IntegrityError, match="crc32c"):
                await c.push(node.target, h, memoryview(data), 10)
            assert node.store.shards == {} and node.store.reserved_bytes == 0
    run(main())
