"""Bulk data connections: shard bytes between daemons over a raw TCP socket, not gRPC messages.

gRPC copies every message several times on each side; a raw socket lets the sender ``sendall``
straight from the slot's memory and the receiver ``recv_into`` straight into the destination
slot, so a replica costs the kernel's copies plus one crc32c pass on the receiver. The gRPC call
(authenticated by the peer token, TLS when configured) still carries the header and the final
status; it hands out a one-time ``BulkTicket`` for the data connection (format: the top of
peer_service.proto). Frames are one integrity chunk each and carry that chunk's crc32c from the
shard's checksum list, so the sender computes nothing; the receiver verifies every frame with
``StreamVerifier`` before the bytes count.

Invariants: a listener hands a connection only to the call that holds its ticket (16 random
bytes, compared in constant time, single use, withdrawn when the call ends); a frame's offset and
length are checked before a byte lands in the destination; a blocking transfer runs in a worker
thread, and a cancelled call shuts the socket down and waits for that thread before the caller
may release the destination buffer.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Final, TypeVar

from ckptd.core.errors import IntegrityError, InvalidArgument, TierFailed, Timeout
from ckptd.core.integrity import StreamVerifier

log = logging.getLogger("ckptd.peer")
MAGIC: Final = b"CKB1"
TICKET_BYTES: Final = 16
FRAME_HEAD: Final = struct.Struct("<QII")  # offset, length, crc32c
HANDSHAKE_TIMEOUT_S: Final = 5.0
# The receiver sleeps until this much is queued instead of waking for every burst of segments:
# 512 MiB over loopback took ~170 recv calls instead of ~2300, and 15-25% less CPU on each side.
RCVLOWAT_BYTES: Final = 2**20
REFUSAL_LOG_INTERVAL_S: Final = 10.0
T = TypeVar("T")


def split_target(target: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port) with IPv6 brackets removed."""
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class BulkListener:
    """The accepting side of bulk connections; one per PeerServer, next to its gRPC port."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host.strip("[]") or "0.0.0.0"
        self.port = port
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[bytes, asyncio.Future[socket.socket]] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._refused = 0
        self._last_refusal_log_s = -REFUSAL_LOG_INTERVAL_S

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        dualstack = self.host == "::" and socket.has_dualstack_ipv6()  # like gRPC's "[::]:port"
        self._sock = socket.create_server((self.host, self.port), family=family, backlog=64,
                                          dualstack_ipv6=dualstack)
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._task = asyncio.create_task(self._accept_loop(), name="peer-bulk-accept")
        return self.port

    def offer(self) -> tuple[bytes, asyncio.Future[socket.socket]]:
        """A fresh ticket and the future its connection will resolve; ``withdraw`` it when done."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        fut: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        self._pending[ticket] = fut
        return ticket, fut

    def withdraw(self, ticket: bytes) -> None:
        fut = self._pending.pop(ticket, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, *self._handshakes, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        for ticket in list(self._pending):
            self.withdraw(ticket)

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: log, back off, keep serving
                log.warning("bulk listener accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            hello = bytearray()
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                while len(hello) < len(MAGIC) + TICKET_BYTES:
                    part = await loop.sock_recv(conn, len(MAGIC) + TICKET_BYTES - len(hello))
                    if not part:
                        raise ConnectionError("closed during the handshake")
                    hello += part
            got = bytes(hello[len(MAGIC):])
            match = next((t for t in list(self._pending) if hmac.compare_digest(t, got)), None)
            fut = self._pending.pop(match, None) if match is not None and hello.startswith(MAGIC) else None
            if fut is None or fut.done():
                raise ConnectionError("unknown or used ticket")
            fut.set_result(conn)
        except (OSError, TimeoutError) as exc:
            self._refused += 1
            now = time.monotonic()
            if now - self._last_refusal_log_s >= REFUSAL_LOG_INTERVAL_S:  # a flood logs one line per interval
                log.warning("bulk connection refused: %s (%d refused since the last report)", exc, self._refused)
                self._last_refusal_log_s, self._refused = now, 0
            conn.close()


def connect(host: str, port: int, ticket: bytes, timeout_s: float) -> socket.socket:
    """Dial a peer's bulk listener and present the ticket (blocking; run in a thread)."""
    try:
        sock = socket.create_connection((host, port), timeout=max(timeout_s, 0.001))
        sock.sendall(MAGIC + ticket)
    except TimeoutError:
        raise Timeout(f"bulk connection to {host}:{port} timed out") from None
    except OSError as exc:
        raise TierFailed(f"bulk connection to {host}:{port} failed: {exc}") from None
    return sock


class _Reader:
    """Exact reads from a bulk socket that ask the kernel to wake this thread only once
    ``RCVLOWAT_BYTES`` are queued (or the rest of the read, if less: a wait for bytes that will
    never come would end in the idle timeout), instead of once per burst of segments.

    The socket must have a timeout: then each read polls for the mark and takes what is queued.
    A blocking read below the mark counts only the bytes queued, not those it already took, and
    at the end of a stream can sleep for good (seen with a 1 MiB mark and 0.9 MiB left)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lowat = 1  # the kernel's default
        self.tunable = hasattr(socket, "SO_RCVLOWAT")

    def _lowat(self, nbytes: int) -> None:
        if self.tunable and nbytes != self.lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
                self.lowat = nbytes
            except OSError:  # not supported here: one wake-up per burst, as before
                self.tunable = False

    def exact(self, view: memoryview) -> None:
        assert self.sock.gettimeout() is not None, "a bulk read needs a timeout (see _Reader)"
        got = 0
        while got < view.nbytes:
            self._lowat(min(RCVLOWAT_BYTES, view.nbytes - got))
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise TierFailed(f"bulk connection closed by the peer ({got} of {view.nbytes} bytes of a frame)")
            got += n


def send_frames(sock: socket.socket, view: memoryview, chunk_bytes: int, crcs: Sequence[int],
                idle_timeout_s: float, start_offset: int = 0) -> None:
    """Send ``view`` (shard bytes from ``start_offset``) as frames of one integrity chunk each,
    with their known crc32c ``crcs[i]`` (blocking)."""
    try:
        sock.settimeout(idle_timeout_s)
        for i, off in enumerate(range(0, view.nbytes, chunk_bytes)):
            piece = view[off : off + chunk_bytes]
            sock.sendall(FRAME_HEAD.pack(start_offset + off, piece.nbytes, crcs[i]))
            sock.sendall(piece)
    except TimeoutError:
        raise Timeout(f"bulk send stalled for {idle_timeout_s}s (peer not reading)") from None
    except OSError as exc:
        raise TierFailed(f"bulk send failed: {exc}") from None


def recv_frames(sock: socket.socket, dst: memoryview, verifier: StreamVerifier, idle_timeout_s: float,
                on_verified: Callable[[int], None] | None = None, sink_fd: int | None = None) -> None:
    """Receive frames into ``dst`` and verify each; raise on anything malformed (blocking).

    A frame's place is checked before a byte of it lands in ``dst``; its crc32c is then computed
    by a second thread while this one receives the next frame, so the verification overlaps the
    transfer. ``on_verified(n)`` is called by that thread as soon as the verified prefix grows to
    n bytes (not when this one next looks: a reader copying behind the transfer starts a frame
    earlier, and the last frame's wait ends with its check).

    With ``sink_fd`` (the file ``dst`` maps, from offset 0, not yet touched through ``dst``),
    frames are received into three rotating frame buffers and, once verified, written with
    ``pwrite`` into the file: the bytes land in the same pages without faulting each 4 KiB page
    into this process's mapping, which on tmpfs costs about three times the copy itself.
    """
    head = bytearray(FRAME_HEAD.size)
    head_view = memoryview(head)
    pending: deque[Future[None]] = deque()
    checker = ThreadPoolExecutor(1, thread_name_prefix="ckptd-bulk-crc")
    frames: list[bytearray] = []  # sink_fd: rotating frame buffers (a frame is reused once settled)

    def settle(block: bool) -> None:
        while pending and (block or pending[0].done()):
            pending.popleft().result()  # IntegrityError / InvalidArgument surface here

    def land(off: int, piece: memoryview, crc: int) -> None:
        """Verify a frame, write it to the sink, report the verified prefix now in place (the
        checker is one thread, so frames land and are reported in order)."""
        verifier.feed(off, piece, crc)
        verified = verifier.verified_bytes
        if sink_fd is not None:
            pwrite_all(sink_fd, piece, off)
        if on_verified is not None:
            on_verified(verified)

    reader = _Reader(sock)
    try:
        try:
            sock.settimeout(idle_timeout_s)
            expected = verifier.received
            frame_no = 0
            while expected < verifier.nbytes:
                reader.exact(head_view)
                off, n, crc = FRAME_HEAD.unpack(head)
                verifier.check_place(off, n, expected)  # before a byte lands in dst
                if sink_fd is None:
                    piece = dst[off : off + n]
                else:
                    if len(frames) < 3:
                        frames.append(bytearray(n))
                    buf = frames[frame_no % 3]
                    if len(buf) < n:
                        buf = frames[frame_no % 3] = bytearray(n)
                    piece = memoryview(buf)[:n]
                reader.exact(piece)
                expected = off + n
                frame_no += 1
                pending.append(checker.submit(land, off, piece, crc))
                settle(block=len(pending) > 2)  # at most two frames received ahead of their check
            settle(block=True)
            verifier.finish()
        except TimeoutError:
            raise Timeout(f"bulk receive stalled for {idle_timeout_s}s (peer not sending)") from None
        except OSError as exc:
            raise TierFailed(f"bulk receive failed: {exc}") from None
    except (IntegrityError, InvalidArgument):
        raise  # a frame's own check, in order: the first failure (later frames fail after it)
    except Exception:
        # A frame that failed its check explains whatever followed (e.g. the sender hanging up).
        for fut in pending:
            if (err := fut.exception()) is not None:
                raise err from None
        raise
    finally:
        for fut in pending:
            fut.cancel()
        checker.shutdown(wait=True)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (blocking)."""
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def verifier_for_frames(nbytes: int, chunk_bytes: int, crcs: Sequence[int]) -> StreamVerifier:
    if chunk_bytes > 2**31:
        raise InvalidArgument(f"chunk_bytes {chunk_bytes} too large for bulk frames")
    return StreamVerifier(nbytes, chunk_bytes, crcs, max_chunk_bytes=max(chunk_bytes, 1))


async def in_thread(executor: Executor, sock: socket.socket, fn: Callable[..., T], *args: object) -> T:
    """Run a blocking transfer on ``sock`` in a worker; on cancel, shut the socket down and wait
    for the worker to leave before re-raising (it may be writing into a caller's buffer)."""
    afut = asyncio.wrap_future(executor.submit(fn, sock, *args))
    try:
        return await asyncio.shield(afut)
    except asyncio.CancelledError:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        while not afut.done():
            try:
                await asyncio.wait([afut])
            except asyncio.CancelledError:
                continue  # the buffer must not be released under a running worker
        if not afut.cancelled():
            afut.exception()  # retrieved: the caller's cancel is what matters
        raise
