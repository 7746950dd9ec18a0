"""``ckptd`` command line: ``ckptd serve --config ckptd.toml [flags]``.

Flags override env (CKPTD_*), which overrides the TOML file. Exit codes: 0 clean stop,
2 bad config or usage, 1 start-up failure (e.g. another daemon holds the root, or the daemon's
dependencies are not installed: ``pip install 'ckptd[daemon]'``, plus ``[s3]`` for the object tier).
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
from ckptd.core import config, logs
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
    return p


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
        return asyncio.run(serve(cfg))
    except CkptdError as exc:
        print(f"ckptd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
