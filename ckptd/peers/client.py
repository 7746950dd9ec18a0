"""PeerClient: a daemon's asyncio client of other daemons' PeerService (grpc.aio over TCP).

``push`` streams a shard straight from the caller's buffer: each transfer chunk is a memoryview
slice encoded into its message with one copy (peer_wire.py), never the whole shard at once.
Back-pressure: at most ``max_inflight_bytes`` of all this client's pushes are being handed to
gRPC at any moment, and each call writes one message at a time under HTTP/2 flow control, so a
slow peer slows its pushes (never the caller's other work) and a stopped one is abandoned at the
push's deadline. ``fetch_into`` writes a peer's shard into a caller's buffer and verifies every
chunk crc32c, the integrity-chunk crc32c list and the size before returning; given byte ranges,
it fetches and verifies only the integrity chunks covering them (peers/ranged.py).

Errors are typed: Timeout (deadline passed), TierFailed (peer down, reset, cancelled),
IntegrityError (a copy or stream that does not verify), Unauthenticated, or the servicer's own
type. Only transport failures (UNAVAILABLE without a typed reason) are retried, with exponential
backoff, up to ``max_attempts`` and never past the deadline; each such failure retires the
peer's channel, so the next call connects anew instead of waiting out grpc's reconnect backoff
(a peer that restarted is pushed to on the next step, not seconds later).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Final, TypeVar

import grpc

from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core import metrics
from ckptd.core.config.peers import TlsFiles
from ckptd.core.errors import CkptdError, IntegrityError, InvalidArgument, TierFailed, Timeout
from ckptd.core.integrity import StreamVerifier, crc32c
from ckptd.core.manifest import ReplicaHeader
from ckptd.core.types import MAX_TRANSFER_CHUNK_BYTES
from ckptd.peers.budget import ByteBudget
from ckptd.peers.bulk import connect as bulk_connect
from ckptd.peers.bulk import in_thread, pwrite_all, recv_frames, send_frames, split_target, verifier_for_frames
from ckptd.peers.ranged import read_ranged
from ckptd.peers.tls import channel_credentials
from ckptd.peers.types import (
    FetchResult,
    FileBacked,
    Holding,
    PingInfo,
    PushResult,
    ReadyReport,
    ReadyState,
)
from ckptd.peers.wire import (
    ACCEPT_METADATA_KEY,
    BULK_METADATA_KEY,
    CHANNEL_OPTIONS,
    SERVICE,
    RawChunk,
    auth_metadata,
    decode_fetch_response,
    encode_stream_message,
    header_from_pb,
    header_to_pb,
    is_transport_failure,
    peer_error,
)

log = logging.getLogger("ckptd.peer")
T = TypeVar("T")
DEADLINE_GRACE_S: Final = 0.5  # local bound beyond the gRPC deadline, should gRPC itself stall
RETIRE_GRACE_S: Final = 30.0  # a channel replaced after a transport failure lets its calls run this long
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # end-of-stream marker
Destination = memoryview | FileBacked | Callable[[ReplicaHeader], Awaitable[memoryview | FileBacked]]


class PeerClient:
    """Calls to peers; one cached channel per target. Use from one event loop; ``close`` at the end."""

    def __init__(self, token: str, node_id: str = "", *, chunk_bytes: int = MAX_TRANSFER_CHUNK_BYTES,
                 max_inflight_bytes: int = 64 * 2**20, max_attempts: int = 3, backoff_s: float = 0.05,
                 tls: TlsFiles | None = None, bulk: bool = True, executor: Executor | None = None) -> None:
        if not 0 < chunk_bytes <= MAX_TRANSFER_CHUNK_BYTES:
            raise InvalidArgument(f"transfer chunk_bytes must be in (0, {MAX_TRANSFER_CHUNK_BYTES}]")
        self.node_id = node_id
        self.bulk = bulk and tls is None  # bulk connections are plain TCP: never under TLS
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(8, thread_name_prefix="ckptd-peer-cli")
        self.chunk_bytes = chunk_bytes
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.budget = ByteBudget(max(max_inflight_bytes, chunk_bytes))
        self._md = auth_metadata(token)
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}  # closing after a transport failure

    def _channel(self, target: str) -> grpc.aio.Channel:
        ch = self._channels.get(target)
        if ch is None:
            opts: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
            if self._tls is None:
                ch = grpc.aio.insecure_channel(target, options=opts)
            else:
                if self._tls.server_name:
                    opts.append(("grpc.ssl_target_name_override", self._tls.server_name))
                ch = grpc.aio.secure_channel(target, channel_credentials(self._tls), options=opts)
            self._channels[target] = ch
        return ch

    async def forget(self, target: str) -> None:
        """Close the channel of a peer that left the job."""
        ch = self._channels.pop(target, None)
        if ch is not None:
            await ch.close(None)

    def _renew(self, target: str, failed: grpc.aio.Channel) -> None:
        """After a transport failure on ``failed``: the next call to ``target`` opens a new channel.

        A channel that lost its peer reconnects on grpc's backoff (up to CHANNEL_OPTIONS' cap), and
        a call made meanwhile fails at once even when the peer is back; a new channel connects on
        its first call. The old one closes in the background with a grace period, so calls still
        running on it (other shards to the same peer) finish or fail on their own."""
        if self._channels.get(target) is failed:
            del self._channels[target]
            task = asyncio.create_task(failed.close(RETIRE_GRACE_S))
            self._retiring[task] = failed
            task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def close(self) -> None:
        for target in list(self._channels):
            await self.forget(target)
        retiring = dict(self._retiring)
        for task, channel in retiring.items():  # stop waiting out the grace: cancel their calls now
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close(None)
        if self._own_executor:
            self.executor.shutdown(wait=False)

    async def _call(self, target: str, deadline_s: float, what: str,
                    op: Callable[[float], Awaitable[T]], max_attempts: int | None = None, method: str = "") -> T:
        """Run op(remaining_s) with retries on transport failures, bounded by the deadline and by
        ``max_attempts`` (the client's own when None). Each attempt counts as one call of
        ``method`` (default: ``what``) in ``ckptd_peer_rpcs_sent_total``."""
        sent = metrics.PEER_RPCS_SENT.labels(method or what)
        deadline = time.monotonic() + deadline_s
        attempts = self.max_attempts if max_attempts is None else max(1, max_attempts)
        delay = self.backoff_s
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{what} to peer {target}: no time left after {attempt - 1} attempt(s)")
            channel = self._channel(target)
            sent.inc()
            try:
                async with asyncio.timeout(remaining + DEADLINE_GRACE_S):
                    return await op(remaining)
            except TimeoutError:
                raise Timeout(f"{what} to peer {target} did not finish in {deadline_s:.3g}s") from None
            except grpc.aio.AioRpcError as err:
                if is_transport_failure(err):
                    self._renew(target, channel)
                if (is_transport_failure(err) and attempt < attempts
                        and deadline - time.monotonic() > delay):
                    log.info("%s to peer %s failed (%s); retry %d in %.2fs", what, target,
                             err.details(), attempt, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                exc = peer_error(err, target)
                if isinstance(exc, TierFailed) and is_transport_failure(err):
                    exc = TierFailed(f"{what} to peer {target} failed after {attempt} attempt(s): "
                                     f"{err.details()}")
                raise exc from None

    # -- push ---------------------------------------------------------------------------------
    async def push(self, target: str, header: ReplicaHeader, view: memoryview, deadline_s: float) -> PushResult:
        """Stream one shard from ``view`` (exactly ``header.nbytes``) to the peer at ``target``."""
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if view.nbytes != header.nbytes:
            raise InvalidArgument(f"buffer of {view.nbytes} bytes for a shard of {header.nbytes}")
        first = ppb.PushReplicaRequest(header=header_to_pb(header), want_bulk=self.bulk)
        t0 = time.monotonic()
        resp = await self._call(target, deadline_s, f"push of {header.job}@{header.step} rank {header.rank}",
                                lambda remaining: self._push_once(target, header, first, view, remaining),
                                method="PushReplica")
        return PushResult(resp.node_id, header.nbytes, time.monotonic() - t0, resp.already_held, tuple(resp.tiers))

    async def _push_once(self, target: str, header: ReplicaHeader, first: ppb.PushReplicaRequest,
                         view: memoryview, remaining_s: float) -> ppb.PushReplicaResponse:
        method = self._channel(target).stream_unary(
            f"/{SERVICE}/PushReplica", request_serializer=encode_stream_message,
            response_deserializer=ppb.PushReplicaResponse.FromString)
        call = method(None, timeout=remaining_s, metadata=self._md)
        try:
            await call.write(first)
            md: Any = await call.initial_metadata()
            offer = dict(md or ())
            if ACCEPT_METADATA_KEY not in offer:
                return await call  # type: ignore[no-any-return]  # already held, or refused
            if self.bulk and BULK_METADATA_KEY in offer:
                ticket = ppb.BulkTicket.FromString(offer[BULK_METADATA_KEY])
                sock = await self._connect_bulk(target, ticket, remaining_s)
                e = header.entry
                try:
                    await in_thread(self.executor, sock, send_frames, view, e.chunk_bytes, e.chunk_crc32c,
                                    remaining_s)
                except CkptdError:
                    await self._raise_peer_status(call)  # the peer refused the bytes: say why
                    raise
                finally:
                    sock.close()
                await call.done_writing()
                return await call  # type: ignore[no-any-return]
            n, step = view.nbytes, self.chunk_bytes
            for off in range(0, n, step):
                piece = view[off : off + step]
                held = await self.budget.acquire(len(piece))
                try:
                    await call.write(RawChunk(off, piece, crc32c(piece)))
                finally:
                    await self.budget.release(held)
            await call.done_writing()
        except asyncio.InvalidStateError:
            pass  # the peer ended the call while we wrote: its status says why
        except BaseException:
            call.cancel()
            raise
        return await call  # type: ignore[no-any-return]

    @staticmethod
    async def _raise_peer_status(call: Any, wait_s: float = 1.0) -> None:
        """After a bulk connection broke: if the call ended with an error, raise that (typed by
        ``_call``) instead of the socket's symptom; otherwise return."""
        code = asyncio.ensure_future(call.code())
        done, _ = await asyncio.wait({code}, timeout=wait_s)
        if not done:
            code.cancel()
        elif code.result() != grpc.StatusCode.OK:
            await call

    async def _connect_bulk(self, target: str, ticket: ppb.BulkTicket, timeout_s: float) -> socket.socket:
        host, _ = split_target(target)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, bulk_connect, host, ticket.port, ticket.ticket,
                                          min(timeout_s, 10.0))

    # -- fetch --------------------------------------------------------------------------------
    async def fetch_into(self, target: str, job: str, step: int, rank: int, dst: Destination,
                         deadline_s: float, on_verified: Callable[[int], None] | None = None,
                         ranges: Sequence[tuple[int, int]] = ()) -> FetchResult:
        """Fetch a shard into ``dst`` (a buffer of >= nbytes, or an async factory given the header).

        Returns the verified header (layout and checksums) and the peer tier that served it.
        ``on_verified(n)`` (called from any thread) reports that the first n bytes of ``dst`` are
        written and matched the shard's checksum list, so a reader may consume them already.
        ``ranges`` (byte ranges of the shard): only the integrity chunks covering them are fetched
        and verified (the rest of ``dst`` is left as it was; ``on_verified`` is not called); a
        peer that predates ranged fetches sends, and this verifies, the whole shard.
        """
        request = ppb.FetchShardRequest(job=job, step=step, rank=rank, requester_node=self.node_id,
                                        want_bulk=self.bulk and not ranges,
                                        ranges=[ppb.ShardRange(offset=o, length=n) for o, n in ranges])
        resolved: list[memoryview | FileBacked] = []
        t0 = time.monotonic()

        async def once(remaining_s: float) -> FetchResult:
            method = self._channel(target).unary_stream(
                f"/{SERVICE}/FetchShard", request_serializer=ppb.FetchShardRequest.SerializeToString,
                response_deserializer=decode_fetch_response)
            call = method(request, timeout=remaining_s, metadata=self._md)
            try:
                return await self._read_shard(target, call, (job, step, rank), dst, resolved, t0, remaining_s,
                                              on_verified, ranges)
            except BaseException:
                call.cancel()
                raise

        return await self._call(target, deadline_s, f"fetch of {job}@{step} rank {rank}", once, method="FetchShard")

    async def _read_shard(self, target: str, call: Any, key: tuple[str, int, int], dst: Destination,
                          resolved: list[memoryview | FileBacked], t0: float, remaining_s: float,
                          on_verified: Callable[[int], None] | None = None,
                          ranges: Sequence[tuple[int, int]] = ()) -> FetchResult:
        first = await call.read()
        sink_fd: int | None = None  # the destination file, when written through it (FileBacked)
        if first is _EOF:
            raise IntegrityError(f"peer {target} ended the shard stream before its header")
        try:
            if not isinstance(first, ppb.FetchShardResponse) or first.WhichOneof("body") != "header":
                raise InvalidArgument("the stream does not start with a header")
            header = header_from_pb(first.header)
            if header.key != key:
                raise InvalidArgument(f"peer sent {header.key}, not the requested {key}")
            if not resolved:
                resolved.append(dst if isinstance(dst, memoryview | FileBacked) else await dst(header))
            backing = resolved[0] if isinstance(resolved[0], FileBacked) else None
            buf = resolved[0].view if isinstance(resolved[0], FileBacked) else resolved[0]
            buf = buf.cast("B") if buf.format != "B" else buf
            if buf.nbytes < header.nbytes or buf.readonly:
                raise CkptdError(f"destination of {buf.nbytes} bytes (read-only: {buf.readonly}) "
                                 f"for a shard of {header.nbytes}")
            e = header.entry
            if backing is not None:
                sink_fd = os.open(backing.path, os.O_WRONLY)  # tmpfs: microseconds
            if first.chunks_only:
                if not ranges:  # the bytes it would leave out are asked for: never hand them out unsent
                    raise InvalidArgument("chunks only, in answer to a whole-shard fetch")
                await read_ranged(call, header, ranges, lambda msg: self._put(msg, buf, sink_fd))
            elif first.HasField("bulk"):
                verifier = verifier_for_frames(e.nbytes, e.chunk_bytes, e.chunk_crc32c)
                sock = await self._connect_bulk(target, first.bulk, remaining_s)
                try:
                    await in_thread(self.executor, sock, recv_frames, buf[: e.nbytes], verifier, remaining_s,
                                    on_verified, sink_fd)
                finally:
                    sock.close()
                if await call.read() is not _EOF:
                    raise InvalidArgument("chunks on the gRPC stream after a bulk transfer")
                verifier.finish()
            else:
                verifier = StreamVerifier(e.nbytes, e.chunk_bytes, e.chunk_crc32c)
                while (msg := await call.read()) is not _EOF:
                    if not isinstance(msg, RawChunk):
                        raise InvalidArgument("a second header inside the stream")
                    verifier.feed(msg.offset, msg.data, msg.crc32c)
                    await self._put(msg, buf, sink_fd)
                    if on_verified is not None:
                        on_verified(verifier.verified_bytes)
                verifier.finish()
        except InvalidArgument as exc:
            raise IntegrityError(f"peer {target} sent an invalid shard stream: {exc}") from None
        except IntegrityError as exc:
            raise IntegrityError(f"peer {target}: {exc}") from None
        except TimeoutError:
            raise
        except OSError as exc:  # opening or writing the destination file (ENOSPC)
            raise TierFailed(f"fetch from peer {target} failed: {exc}") from None
        finally:
            if sink_fd is not None:
                os.close(sink_fd)
        return FetchResult(header, first.tier, time.monotonic() - t0)

    async def _put(self, msg: RawChunk, buf: memoryview, sink_fd: int | None) -> None:
        """Write one verified transfer chunk into the destination (its file when ``sink_fd``)."""
        if sink_fd is None:
            buf[msg.offset : msg.offset + len(msg.data)] = msg.data
        else:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, pwrite_all, sink_fd, memoryview(msg.data), msg.offset)

    # -- small calls --------------------------------------------------------------------------
    async def list_holdings(self, target: str, job: str = "", deadline_s: float = 10.0,
                            max_attempts: int | None = None) -> list[Holding]:
        async def once(remaining_s: float) -> list[Holding]:
            method = self._channel(target).unary_unary(
                f"/{SERVICE}/ListHoldings", request_serializer=ppb.ListHoldingsRequest.SerializeToString,
                response_deserializer=ppb.ListHoldingsResponse.FromString)
            resp = await method(ppb.ListHoldingsRequest(job=job, requester_node=self.node_id),
                                timeout=remaining_s, metadata=self._md)
            return [Holding(h.job, h.step, h.rank, h.world_size, h.nbytes, tuple(h.tiers), h.step_complete,
                            h.source_node) for h in resp.holdings]
        return await self._call(target, deadline_s, "ListHoldings", once, max_attempts)

    async def report_ready(self, target: str, report: ReadyReport, deadline_s: float = 10.0) -> ReadyState:
        req = ppb.ReportReadyRequest(job=report.job, step=report.step, world_size=report.world_size,
                                     tier=report.tier, node_id=report.node_id, ranks=list(report.ranks),
                                     failed=report.failed, message=report.message, wait_s=report.wait_s)

        async def once(remaining_s: float) -> ReadyState:
            method = self._channel(target).unary_unary(
                f"/{SERVICE}/ReportReady", request_serializer=ppb.ReportReadyRequest.SerializeToString,
                response_deserializer=ppb.ReportReadyResponse.FromString)
            r = await method(req, timeout=remaining_s, metadata=self._md)
            return ReadyState(r.job, r.step, r.tier, r.world_size, tuple(r.ready_ranks), tuple(r.failed_ranks),
                              r.coordinator_node, tuple(r.ready_nodes))
        return await self._call(target, deadline_s + report.wait_s, "ReportReady", once)

    async def ping(self, target: str, deadline_s: float = 5.0, max_attempts: int | None = None) -> PingInfo:
        async def once(remaining_s: float) -> PingInfo:
            method = self._channel(target).unary_unary(
                f"/{SERVICE}/Ping", request_serializer=ppb.PingRequest.SerializeToString,
                response_deserializer=ppb.PingResponse.FromString)
            t0 = time.monotonic()
            r = await method(ppb.PingRequest(node_id=self.node_id), timeout=remaining_s, metadata=self._md)
            return PingInfo(r.node_id, r.failure_domain, r.version, r.unix_time_s, time.monotonic() - t0)
        return await self._call(target, deadline_s, "Ping", once, max_attempts)
