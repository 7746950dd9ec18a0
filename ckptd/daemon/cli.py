"""``ckptd`` command line: ``ckptd serve --config ckptd.toml [flags]`` and ``ckptd health``.

Flags override env (CKPTD_*), which overrides the TOML file. Exit codes: 0 clean stop,
2 bad config or usage, 1 start-up failure (e.g. another daemon holds the root, or the daemon's
dependencies are not installed: ``pip install 'ckptd[daemon]'``, plus ``[s3]`` for the object tier).

``ckptd health --socket PATH [--timeout-s S] [--service NAME]`` asks a daemon's standard
grpc.health.v1 service over its Unix socket (the probe of a Kubernetes exec check, since the daemon
listens on no TCP port of its own): exit 0 when it answers SERVING, else one line on stderr and
exit 1. It reads no config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from ckptd import __version__
from ckptd.core import config, logs, sched
from ckptd.core.errors import CkptdError, InvalidArgument
from ckptd.daemon import check

#: Modules of the ``daemon`` extra, which the base (training-side) install does not bring.
DAEMON_ONLY_MODULES = frozenset({"grpc_health", "prometheus_client"})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptd", description="ckptd node-local checkpoint daemon")
    p.add_argument("--version", action="version", version=f"ckptd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the daemon until SIGTERM")
    s.add_argument("--config", type=Path, help="TOML config file")
    s.add_argument("--root", help="daemon root directory (disk tier, lock, socket)")
    s.add_argument("--socket", help="Unix socket path")
    s.add_argument("--shm-dir", help="private shared-memory directory for slots")
    s.add_argument("--budget-bytes", help="shared-memory byte budget, e.g. 8GiB")
    s.add_argument("--no-disk", action="store_true", help="disable the disk tier")
    s.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    s.add_argument("--release-memory-on-exit", nargs="?", const="durable", choices=("off", "durable", "force"),
                   help="at a clean stop free the shm slots whose shards are durable on disk (durable, the "
                        "default of the flag) or all of them (force); default: keep them for the next daemon")
    s.add_argument("--check", action="store_true",
                   help="validate the config, print it resolved (TOML, or JSON with --json), exit")
    s.add_argument("--json", action="store_true", help="with --check: print the config as JSON")
    h = sub.add_parser("health", help="exit 0 when the daemon's grpc.health.v1 service says SERVING")
    h.add_argument("--socket", required=True, help="the daemon's Unix socket (daemon.socket)")
    h.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check (default 3 s)")
    h.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    return p


def health(socket_path: str, timeout_s: float, service: str = "") -> int:
    """Ask grpc.health.v1 on ``socket_path``; 0 when SERVING, else a one-line error and 1."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = socket_path if socket_path.startswith("unix:") else f"unix:{socket_path}"
    if not timeout_s > 0:
        print("ckptd: health: --timeout-s must be positive", file=sys.stderr)
        return 2
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            detail = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
            name = code.name if code is not None else "error"
            print(f"ckptd: health: {target}: {name}: {detail.splitlines()[0] if detail else 'no answer'}",
                  file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"ckptd: health: {target}: {status}", file=sys.stderr)
        return 1
    return 0


def _flags(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    flags: dict[str, dict[str, Any]] = {}
    for section, key, value in (
        ("daemon", "root", ns.root), ("daemon", "socket", ns.socket),
        ("daemon", "shm_dir", ns.shm_dir), ("daemon", "log_level", ns.log_level),
        ("memory", "budget_bytes", ns.budget_bytes),
        ("daemon", "release_memory_on_exit", ns.release_memory_on_exit),
    ):
        if value is not None:
            flags.setdefault(section, {})[key] = value
    if ns.no_disk:
        flags.setdefault("disk", {})["enabled"] = False
    return flags


def _emit(text: str) -> int:
    """Write to stdout; a reader that went away (``| head -1``) ends it quietly with exit code 1."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the flush at exit must not fail again
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.cmd == "health":
        try:
            return health(ns.socket, ns.timeout_s, ns.service)
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] not in DAEMON_ONLY_MODULES:
                raise
            print(f"ckptd: health needs {exc.name}: pip install 'ckptd[daemon]'", file=sys.stderr)
            return 1
    try:
        cfg = config.load(ns.config, flags=_flags(ns))
    except InvalidArgument as exc:
        print(f"ckptd: config error: {exc}", file=sys.stderr)
        return 2
    if ns.json and not ns.check:
        print("ckptd: --json goes with --check", file=sys.stderr)
        return 2
    if ns.check:
        text = json.dumps(check.resolved(cfg), indent=2) + "\n" if ns.json else check.to_toml(cfg)
        return _emit(text)
    logs.setup(cfg.daemon.log_level)
    try:
        from ckptd.daemon.serve import serve  # heavy imports only when serving
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in DAEMON_ONLY_MODULES:
            raise
        print(f"ckptd: the daemon needs {exc.name}, which a client-only install lacks: "
              "pip install 'ckptd[daemon]'", file=sys.stderr)
        return 1

    try:
        sched.apply(cfg.daemon.nice, cfg.daemon.cpu_affinity)  # before any thread starts: they inherit it
        return asyncio.run(serve(cfg))
    except CkptdError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
