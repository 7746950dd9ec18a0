"""Blocking gRPC connection from a training process (or ckptctl) to its node's daemon.

Address resolution: explicit argument > ``CKPTD_ADDR`` (``unix:/path`` or a path) >
``CKPTD_DAEMON_SOCKET`` > ``{CKPTD_DAEMON_ROOT or /var/lib/ckptd}/run/ckptd.sock``.
Every call goes through ``call``, which rebuilds the daemon's typed error (``ckptd.core.errors``).

``call_later`` sends a request whose answer nobody waits for (a restore's lease release) from
the connection's one worker thread: the next ``call`` on this connection, the next restore
stream and ``close`` first wait for it, so this client's calls still reach the daemon in the
order they were made; a failure of it is logged, not raised.

The channel runs a unary-stream call (the streamed Restore) on the calling thread
(``SingleThreadedUnaryStream``): by default grpc starts a thread to drive the channel whenever no
call is in flight, which every restore would wait for (docs/architecture.md, the restore path).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from ckptd.core.errors import DaemonUnavailable, from_rpc_error

log = logging.getLogger("ckptd_client")
T = TypeVar("T")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def resolve_address(addr: str | os.PathLike[str] | None = None) -> str:
    if addr is None:
        addr = os.environ.get("CKPTD_ADDR") or os.environ.get("CKPTD_DAEMON_SOCKET")
    if addr is None:
        root = os.environ.get("CKPTD_DAEMON_ROOT", "/var/lib/ckptd")
        addr = os.path.join(root, "run", "ckptd.sock")
    addr = os.fspath(addr)
    if addr.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return addr
    return f"unix:{addr}"


def wait_until_serving(
    addr: str | os.PathLike[str] | None, timeout_s: float, *, exit_code: Callable[[], int | None] | None = None
) -> None:
    """Block until the daemon at addr answers, or raise DaemonUnavailable after timeout_s.

    For a daemon just started: a Unix socket that does not exist yet is waited for, and each
    probe uses a fresh channel (one that failed to connect backs off for seconds before its next
    try). ``exit_code`` (e.g. ``Popen.poll``) ends the wait as soon as it reports the daemon
    process exited.
    """
    address = resolve_address(addr)
    path = address.removeprefix("unix:") if address.startswith("unix:") else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rc = exit_code() if exit_code is not None else None
        if rc is not None:
            raise DaemonUnavailable(f"ckptd exited with {rc}")
        if path is None or os.path.exists(path):
            with grpc.insecure_channel(address) as ch:
                try:
                    grpc.channel_ready_future(ch).result(timeout=1)
                    return
                except grpc.FutureTimeoutError:
                    pass
        time.sleep(0.05)
    raise DaemonUnavailable(f"no ckptd daemon answers at {address} within {timeout_s:g}s")


class Connection:
    """One channel and stub; cheap to keep for the life of a trainer."""

    def __init__(self, addr: str | os.PathLike[str] | None = None, timeout_s: float = 60.0) -> None:
        self.address = resolve_address(addr)
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("SingleThreadedUnaryStream", 1),  # grpc.experimental.ChannelOptions.SingleThreadedUnaryStream
        ])
        self.stub = pb_grpc.CheckpointServiceStub(self.channel)
        self._later: list[tuple[Future[Any], str]] = []  # call_later's, waited for by the next call
        self._worker: ThreadPoolExecutor | None = None  # call_later's thread, made at its first use

    def call(self, method: Callable[..., T], request: Any, timeout_s: float | None = None) -> T:
        if self._later:
            self.settle()
        try:
            return method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def call_later(self, method: Callable[..., Any], request: Any, what: str) -> None:
        """Send ``request`` from the worker thread and return at once; the next ``call`` or
        ``close`` waits for it."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="ckptd-rpc-later")
        self._later.append((self._worker.submit(method, request, timeout=self.timeout_s), what))

    def settle(self) -> None:
        """Wait for every ``call_later`` sent so far; log (not raise) those that failed."""
        later, self._later = self._later, []
        for future, what in later:
            try:
                future.result()
            except grpc.RpcError as err:
                log.warning("ckptd: %s failed: %s", what, from_rpc_error(err))

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the daemon answers, or raise DaemonUnavailable."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise DaemonUnavailable(f"no ckptd daemon answers at {self.address}") from None

    def close(self) -> None:
        self.settle()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self.channel.close()
