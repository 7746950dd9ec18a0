"""``ckptd serve``: run one daemon behind its gRPC servers until SIGTERM/SIGINT.

``serve`` claims the socket path (ckptd/daemon/instance.py: refused while a live daemon serves
it), builds the ``Daemon`` (ckptd/daemon/wiring.py) and starts it, starts the metrics listener
and the peer server when configured, binds the Unix socket (0600 in a 0700 directory, or group
access as configured)
with the CheckpointService servicer and grpc.health.v1, and on SIGTERM/SIGINT reports
NOT_SERVING, stops the peer server, drains the daemon, stops the gRPC server and removes the
socket. It is the only importer of the wiring module (with the ``ckptd`` command line above it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ckptd.core.config import Config
from ckptd.core.errors import FailedPrecondition
from ckptd.daemon import instance
from ckptd.daemon.wiring import Daemon
from ckptd.rpc.server import MAX_MESSAGE_BYTES, SERVICE_NAME, CheckpointServicer, add_checkpoint_servicer

log = logging.getLogger("ckptd.server")


async def serve(cfg: Config, ready: Callable[[], None] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit code."""
    sock = cfg.socket_path
    if sock.exists() and not sock.is_socket():  # a stale socket is replaced; any other file is not ours
        raise FailedPrecondition(f"daemon.socket {sock} exists and is not a socket; refusing to replace it")
    # claim the socket first: a second daemon given a live daemon's socket stops before it touches its root
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    instance.claim_socket(sock, cfg.daemon.root)
    daemon = Daemon(cfg)
    await daemon.start()
    if cfg.metrics.address:
        from ckptd.core.metrics import serve_http

        serve_http(cfg.metrics.address)
    peer_server = None
    if daemon.membership is not None and daemon.replicas is not None:
        from ckptd.core.config.peers import load_token, tls_files
        from ckptd.peers.server import PeerServer, start_peer_server

        p = cfg.peers
        directory = daemon.membership.directory
        servicer = PeerServer(directory.node_id, daemon.replicas, daemon.replicas, daemon.replicas.holdings,
                              directory.board.report, failure_domain=p.failure_domain, chunk_bytes=p.chunk_bytes,
                              idle_timeout_s=p.push_timeout_s)
        peer_server = await start_peer_server(servicer, p.listen, load_token(p), tls_files(p))
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    add_checkpoint_servicer(CheckpointServicer(daemon.saves, daemon.restores, daemon.steps, daemon.admin,
                                               daemon.membership, daemon.status, cfg.memory.chunk_bytes,
                                               daemon.layouts), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    old_umask = os.umask(0o077)  # the socket is born owner-only: no window before the chmod below
    try:
        server.add_insecure_port(f"unix:{sock}")
    finally:
        os.umask(old_umask)
    await server.start()
    instance.set_socket_access(sock, cfg.shared_gid)  # 0600, or 0660 for daemon.socket_group
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("ckptd %s serving on unix:%s (root %s, shm %s)", daemon.status()["version"], sock,
             cfg.daemon.root, cfg.shm_path)
    if ready is not None:
        ready()
    await stop.wait()
    log.info("shutdown requested: draining")
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if peer_server is not None:
        await peer_server.stop(grace_s=2.0)
    clean = await daemon.stop()
    await server.stop(grace=2.0)
    daemon.close()
    sock.unlink(missing_ok=True)
    log.info("stopped (%s)", "all disk commits finished" if clean else "some drains abandoned")
    return 0

