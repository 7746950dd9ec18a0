"""The PeerService servicer on grpc.aio: receive replicas, serve shards, holdings and readiness.

``PeerServer`` depends only on the protocols of peer_types.py (sink, source, holdings, readiness),
never on the Daemon. ``start_peer_server`` binds it to a TCP address (optionally TLS) behind
``TokenAuthInterceptor``: a call whose metadata lacks the shared peer token is answered
UNAUTHENTICATED and its handler never runs (its request bytes are not even parsed).

PushReplica invariants: the first message is a valid header; the bytes arrive either as gRPC
chunks (contiguous, in order, at most 4 MiB, each matching its crc32c) or, when the sender asked
and a bulk listener runs, over a one-time bulk connection (peer_bulk.py); either way the
integrity-chunk crc32c list of the header matches the bytes and exactly ``nbytes`` arrive. Only
then is ``ReplicaWriter.commit`` called. Any failure, a sender silent for ``idle_timeout_s``, or a
cancelled call aborts the writer (after any bulk worker left its buffer): nothing is kept.
FetchShard serves a held shard the same two ways; the fetcher verifies it. A FetchShard with byte
ranges is answered ``chunks_only`` with the integrity chunks covering them alone, over the gRPC
stream (peers/ranged.py). ``ckptd_peer_served_bytes_total`` counts the shard bytes sent.
Errors map like server.py's ``_rpc``: a CkptdError becomes its status code plus the
``ckptd-error`` trailing metadata naming the class; anything unexpected is INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from ckptd import __version__
from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core import metrics
from ckptd.core.config.peers import TlsFiles
from ckptd.core.errors import (
    ERROR_METADATA_KEY,
    CkptdError,
    FailedPrecondition,
    InvalidArgument,
    MalformedRequest,
    TierFailed,
    Timeout,
    Unauthenticated,
    lenient,
    rpc_handler,
)
from ckptd.core.integrity import StreamVerifier, crc32c
from ckptd.core.manifest import ReplicaHeader
from ckptd.core.types import MAX_TRANSFER_CHUNK_BYTES, validate_job, validate_node_id, validate_step
from ckptd.peers.bulk import BulkListener, in_thread, recv_frames, send_frames, verifier_for_frames
from ckptd.peers.ranged import ranged_chunks
from ckptd.peers.tls import server_credentials
from ckptd.peers.types import (
    HoldingsFn,
    OpenShard,
    ReadyFn,
    ReadyReport,
    ReplicaSink,
    ReplicaWriter,
    ShardSource,
)
from ckptd.peers.wire import (
    ACCEPT_METADATA_KEY,
    BULK_METADATA_KEY,
    SERVER_OPTIONS,
    SERVICE,
    RawChunk,
    decode_push_request,
    encode_stream_message,
    header_from_pb,
    header_to_pb,
    token_matches,
)

log = logging.getLogger("ckptd.peer")


_peer_rpc = rpc_handler
PEER_METHODS = frozenset({"PushReplica", "FetchShard", "ListHoldings", "ReportReady", "Ping"})  # metric labels


def _check_ids(job: str, step: int) -> None:
    validate_job(job)
    validate_step(step)


class PeerServer:
    """Implementation of ckptd.v1.PeerService over narrow dependencies (see peer_types.py)."""

    def __init__(self, node_id: str, sink: ReplicaSink, source: ShardSource, holdings: HoldingsFn,
                 on_ready: ReadyFn | None = None, *, failure_domain: str = "",
                 chunk_bytes: int = MAX_TRANSFER_CHUNK_BYTES, idle_timeout_s: float = 30.0,
                 executor: Executor | None = None) -> None:
        if not 0 < chunk_bytes <= MAX_TRANSFER_CHUNK_BYTES:
            raise InvalidArgument(f"transfer chunk_bytes must be in (0, {MAX_TRANSFER_CHUNK_BYTES}]")
        self.node_id = validate_node_id(node_id)
        self.failure_domain = failure_domain
        self.sink = sink
        self.source = source
        self.holdings = holdings
        self.on_ready = on_ready
        self.chunk_bytes = chunk_bytes
        self.idle_timeout_s = idle_timeout_s
        self.executor = executor or ThreadPoolExecutor(8, thread_name_prefix="ckptd-peer-srv")
        self.bulk: BulkListener | None = None  # set by start_peer_server
        self.received_bytes = 0
        self.served_bytes = 0

    @_peer_rpc
    async def PushReplica(self, request_iterator: AsyncIterator[RawChunk | ppb.PushReplicaRequest | MalformedRequest],
                          context: Any) -> ppb.PushReplicaResponse:
        it = aiter(request_iterator)
        try:
            async with asyncio.timeout(self.idle_timeout_s) as idle:
                first = await anext(it, None)
                if isinstance(first, MalformedRequest):
                    raise first.error()
                if not isinstance(first, ppb.PushReplicaRequest) or first.WhichOneof("body") != "header":
                    raise InvalidArgument("PushReplica must start with a header message")
                header = header_from_pb(first.header)
                e = header.entry
                bulk = self.bulk if first.want_bulk else None
                verifier = (verifier_for_frames(e.nbytes, e.chunk_bytes, e.chunk_crc32c) if bulk
                            else StreamVerifier(e.nbytes, e.chunk_bytes, e.chunk_crc32c))
                idle.reschedule(None)  # the sink bounds its own wait for room (back-pressure)
                writer = await self.sink.begin_replica(header)
                if writer is None:
                    return ppb.PushReplicaResponse(node_id=self.node_id, already_held=True)
                tiers = await self._receive(header, writer, it, context, verifier, bulk, idle)
        except TimeoutError:
            raise Timeout(f"PushReplica sender silent for {self.idle_timeout_s}s") from None
        self.received_bytes += header.nbytes
        return ppb.PushReplicaResponse(node_id=self.node_id, bytes_received=header.nbytes, tiers=list(tiers))

    async def _receive(self, header: ReplicaHeader, writer: ReplicaWriter,
                       it: AsyncIterator[RawChunk | ppb.PushReplicaRequest | MalformedRequest], context: Any,
                       verifier: StreamVerifier, bulk: BulkListener | None, idle: asyncio.Timeout) -> tuple[str, ...]:
        """Fill the writer's buffer (gRPC chunks or a bulk connection), verify, commit; else abort."""
        loop = asyncio.get_running_loop()
        reason = "cancelled"
        try:
            buf = writer.buffer
            if buf.nbytes != header.nbytes:
                raise CkptdError(f"replica sink gave {buf.nbytes} bytes for {header.nbytes}")
            md: list[tuple[str, str | bytes]] = [(ACCEPT_METADATA_KEY, "accept")]
            if bulk is not None:
                ticket, conn = bulk.offer()
                md.append((BULK_METADATA_KEY, ppb.BulkTicket(port=bulk.port, ticket=ticket).SerializeToString()))
            await context.send_initial_metadata(tuple(md))
            if bulk is not None:
                try:
                    idle.reschedule(loop.time() + self.idle_timeout_s)
                    sock = await conn
                finally:
                    bulk.withdraw(ticket)
                idle.reschedule(None)  # the socket has its own idle timeout
                sink_fd = os.open(writer.file, os.O_WRONLY) if writer.file is not None else None
                try:
                    await in_thread(self.executor, sock, recv_frames, buf, verifier, self.idle_timeout_s, None,
                                    sink_fd)
                finally:
                    sock.close()
                    if sink_fd is not None:
                        os.close(sink_fd)
                idle.reschedule(loop.time() + self.idle_timeout_s)
                extra = await anext(it, None)
                if isinstance(extra, MalformedRequest):
                    raise extra.error()
                if extra is not None:
                    raise InvalidArgument("PushReplica sent chunks after a bulk transfer")
            else:
                while True:
                    idle.reschedule(loop.time() + self.idle_timeout_s)
                    msg = await anext(it, None)
                    if msg is None:
                        break
                    if isinstance(msg, MalformedRequest):
                        raise msg.error()
                    if not isinstance(msg, RawChunk):
                        raise InvalidArgument("PushReplica carries a second header")
                    verifier.feed(msg.offset, msg.data, msg.crc32c)
                    buf[msg.offset : msg.offset + len(msg.data)] = msg.data
            verifier.finish()
            idle.reschedule(None)
            tiers = await writer.commit()
            reason = ""
            return tiers
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                reason = str(exc) or type(exc).__name__
            raise
        finally:
            if reason:
                log.warning("replica %s@%d rank %d from %s rejected: %s", header.job, header.step,
                            header.rank, header.source_node, reason)
                await writer.abort(reason)

    @_peer_rpc
    async def FetchShard(self, request: ppb.FetchShardRequest, context: Any) -> None:
        _check_ids(request.job, request.step)
        if request.rank < 0:
            raise InvalidArgument(f"rank {request.rank} is negative")
        shard = await self.source.open_shard(request.job, request.step, request.rank)
        try:
            first = ppb.FetchShardResponse(header=header_to_pb(shard.header), tier=shard.tier)
            e = shard.header.entry
            if request.ranges:  # only the integrity chunks covering them, over the gRPC stream
                chunks = ranged_chunks([(r.offset, r.length) for r in request.ranges], e.chunk_bytes, e.nbytes)
                first.chunks_only = True
                await context.write(first)
                for i in chunks:
                    start = i * e.chunk_bytes
                    await self._serve_span(shard, context, start, min(e.chunk_bytes, e.nbytes - start))
            elif request.want_bulk and self.bulk is not None:
                await self._serve_bulk(shard, first, context, self.bulk)
                self._count_served(e.nbytes)
            else:
                await context.write(first)
                await self._serve_span(shard, context, 0, e.nbytes)
        finally:
            await shard.release()

    async def _serve_span(self, shard: OpenShard, context: Any, start: int, nbytes: int) -> None:
        """Send bytes [start, start + nbytes) of shard as transfer chunks, each with its crc32c."""
        for off in range(start, start + nbytes, self.chunk_bytes):
            data = await shard.read(off, min(self.chunk_bytes, start + nbytes - off))
            await context.write(RawChunk(off, data, crc32c(data)))
            self._count_served(len(data))

    def _count_served(self, nbytes: int) -> None:
        self.served_bytes += nbytes
        metrics.PEER_SERVED_BYTES.inc(nbytes)

    async def _serve_bulk(self, shard: OpenShard, first: ppb.FetchShardResponse, context: Any,
                          bulk: BulkListener) -> None:
        e = shard.header.entry
        ticket, conn = bulk.offer()
        first.bulk.CopyFrom(ppb.BulkTicket(port=bulk.port, ticket=ticket))
        try:
            await context.write(first)
            try:
                sock = await asyncio.wait_for(conn, self.idle_timeout_s)
            except TimeoutError:
                raise Timeout("the fetcher never opened its bulk connection") from None
        finally:
            bulk.withdraw(ticket)
        try:
            if shard.view is not None:
                await in_thread(self.executor, sock, send_frames, shard.view, e.chunk_bytes, e.chunk_crc32c,
                                self.idle_timeout_s)
            else:
                for i, off in enumerate(range(0, e.nbytes, e.chunk_bytes)):
                    data = memoryview(await shard.read(off, min(e.chunk_bytes, e.nbytes - off)))
                    await in_thread(self.executor, sock, send_frames, data, e.chunk_bytes, [e.chunk_crc32c[i]],
                                    self.idle_timeout_s, off)
        finally:
            sock.close()

    @_peer_rpc
    async def ListHoldings(self, request: ppb.ListHoldingsRequest, context: Any) -> ppb.ListHoldingsResponse:
        if request.job:
            validate_job(request.job)
        held = await self.holdings(request.job)
        return ppb.ListHoldingsResponse(node_id=self.node_id, holdings=[
            ppb.Holding(job=h.job, step=h.step, rank=h.rank, world_size=h.world_size, nbytes=h.nbytes,
                        tiers=list(h.tiers), step_complete=h.step_complete, source_node=h.source_node)
            for h in held
        ])

    @_peer_rpc
    async def ReportReady(self, request: ppb.ReportReadyRequest, context: Any) -> ppb.ReportReadyResponse:
        if self.on_ready is None:
            raise FailedPrecondition(f"node {self.node_id} does not coordinate readiness")
        report = ReadyReport(request.job, request.step, request.world_size, request.tier, request.node_id,
                             tuple(request.ranks), request.failed, request.message, request.wait_s).validate()
        st = await self.on_ready(report)
        return ppb.ReportReadyResponse(
            job=st.job, step=st.step, tier=st.tier, world_size=st.world_size, ready_ranks=list(st.ready_ranks),
            failed_ranks=list(st.failed_ranks), complete=st.complete, coordinator_node=st.coordinator_node,
            ready_nodes=list(st.ready_nodes))

    @_peer_rpc
    async def Ping(self, request: ppb.PingRequest, context: Any) -> ppb.PingResponse:
        return ppb.PingResponse(node_id=self.node_id, failure_domain=self.failure_domain,
                                version=__version__, unix_time_s=time.time())


def peer_handler(servicer: PeerServer) -> grpc.GenericRpcHandler[Any, Any]:
    """The method table; chunk streams use the zero-copy codec of peer_wire.py. Request bytes that do
    not parse reach the handler as a MalformedRequest and are answered INVALID_ARGUMENT."""
    return grpc.method_handlers_generic_handler(SERVICE, {
        "PushReplica": grpc.stream_unary_rpc_method_handler(
            servicer.PushReplica, request_deserializer=lenient(decode_push_request, "PushReplicaRequest"),
            response_serializer=ppb.PushReplicaResponse.SerializeToString),
        "FetchShard": grpc.unary_stream_rpc_method_handler(
            servicer.FetchShard,
            request_deserializer=lenient(ppb.FetchShardRequest.FromString, "FetchShardRequest"),
            response_serializer=encode_stream_message),
        "ListHoldings": grpc.unary_unary_rpc_method_handler(
            servicer.ListHoldings,
            request_deserializer=lenient(ppb.ListHoldingsRequest.FromString, "ListHoldingsRequest"),
            response_serializer=ppb.ListHoldingsResponse.SerializeToString),
        "ReportReady": grpc.unary_unary_rpc_method_handler(
            servicer.ReportReady,
            request_deserializer=lenient(ppb.ReportReadyRequest.FromString, "ReportReadyRequest"),
            response_serializer=ppb.ReportReadyResponse.SerializeToString),
        "Ping": grpc.unary_unary_rpc_method_handler(
            servicer.Ping,
            request_deserializer=lenient(ppb.PingRequest.FromString, "PingRequest"),
            response_serializer=ppb.PingResponse.SerializeToString),
    })


async def _deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    context.set_trailing_metadata(((ERROR_METADATA_KEY, Unauthenticated.__name__),))
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong peer token")


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuse every call that lacks the shared token (constant-time compare); run nothing else."""

    def __init__(self, token: str) -> None:
        if not token:
            raise InvalidArgument("the peer token must not be empty")
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method.rpartition("/")[2]
        metrics.PEER_RPCS_RECEIVED.labels(method if method in PEER_METHODS else "other").inc()
        if token_matches(handler_call_details.invocation_metadata, self._token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        # same streaming shape as the real method, raw bytes in and out, the real behaviour unused
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_deny)
        return grpc.unary_unary_rpc_method_handler(_deny)


@dataclass
class RunningPeerServer:
    server: grpc.aio.Server
    servicer: PeerServer
    port: int
    bulk_port: int = 0  # 0: no bulk listener

    async def stop(self, grace_s: float | None = 1.0) -> None:
        if self.servicer.bulk is not None:
            await self.servicer.bulk.close()
            self.servicer.bulk = None
        await self.server.stop(grace_s)


async def start_peer_server(servicer: PeerServer, listen: str, token: str, tls: TlsFiles | None = None,
                            bulk: bool = True, bulk_port: int = 0) -> RunningPeerServer:
    """Bind ``listen`` ("host:port", port 0 picks one) and start serving; return the bound ports.

    A bulk listener (same host, ``bulk_port``, 0 picks one) runs unless ``bulk`` is false or TLS is
    on: bulk connections are plain TCP, so with TLS every byte stays inside the gRPC stream.
    """
    server = grpc.aio.server(options=list(SERVER_OPTIONS), interceptors=[TokenAuthInterceptor(token)])
    server.add_generic_rpc_handlers((peer_handler(servicer),))
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, server_credentials(tls))
    except RuntimeError as exc:
        raise TierFailed(f"cannot listen for peers on {listen}: {exc}") from None
    if not port:
        raise TierFailed(f"cannot listen for peers on {listen}")
    if bulk and tls is None:
        listener = BulkListener(listen.rpartition(":")[0], bulk_port)
        try:
            await listener.start()
        except OSError as exc:
            await server.stop(None)
            raise TierFailed(f"cannot open the bulk listener next to {listen}: {exc}") from None
        servicer.bulk = listener
    await server.start()
    log.info("peer service of node %s on %s (port %d, %s, bulk port %s)", servicer.node_id, listen, port,
             "TLS" if tls else "plaintext", servicer.bulk.port if servicer.bulk else "off")
    return RunningPeerServer(server, servicer, port, servicer.bulk.port if servicer.bulk else 0)
