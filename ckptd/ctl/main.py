"""``ckptctl``: inspect, restore, verify and clean ckptd checkpoints (entry point and arguments).

    ckptctl [--addr ADDR | --root DIR | --bucket B [--endpoint URL] [--preset P] [--prefix P]
             [--region R]] [-o table|json] COMMAND ...
    ckptctl version | status | ls [JOB] | show JOB@STEP [--tensors]
    ckptctl restore JOB@STEP --to DIR [--format safetensors|torch] [--dry-run] [--rank R] [--force]
    ckptctl export JOB@STEP --to DIR [--format safetensors|torch] [--model-key K] [--max-shard-size S]
             [--memory-limit S] [--force]
    ckptctl verify JOB@STEP [--tier memory|disk|object] [--read-data]
    ckptctl gc [JOB] [--tier disk|object] [--dry-run] [--max-to-keep N] [--keep-period P]
    ckptctl rm JOB@STEP [--tier memory|disk|object] --yes [--force] [--dry-run]
    ckptctl pin JOB@STEP | unpin JOB@STEP
    ckptctl --root DIR release-memory [--shm-dir DIR] [--force] [--dry-run]

Targets a running daemon (``--addr``, else ``CKPTD_ADDR``, else the default socket; see
``ckptd_client.rpc``), or with no daemon a disk root (``--root``) or an object store
(``--bucket``). This module parses arguments, opens the source and maps every outcome to the
fixed exit codes: 0 ok, 1 failure, 2 usage, 3 partial, 4 not found, 5 integrity failure, 6 daemon
unavailable, 7 timeout, 130 interrupted. The commands live in ``ckptctl_inspect``,
``ckptctl_restore``, ``ckptctl_verify`` and ``ckptctl_admin``; docs/cli.md is the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ckptd import __version__
from ckptd.core.errors import CkptdError
from ckptd.ctl.output import message

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_NOT_FOUND = 4
EXIT_INTEGRITY = 5
EXIT_UNAVAILABLE = 6
EXIT_TIMEOUT = 7
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and the program's message style (argparse's default is 2 too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"ckptctl: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: beyond it a deadline is a mistake (and grpc overflows)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {MAX_TIMEOUT_S:g} seconds")
    return value


def _rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _count(text: str) -> int:
    value = _rank(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _size(text: str) -> int:
    from ckptd.core.config.sizes import parse_bytes

    try:
        value = parse_bytes(text, "size")
    except CkptdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Global options, accepted before or after the command (``ckptctl ls -o json`` works)."""

    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("target and output")
    g.add_argument("--addr", default=d(None), metavar="ADDR",
                   help="daemon address: unix:/path or a socket path (default: $CKPTD_ADDR, "
                        "$CKPTD_DAEMON_SOCKET, {$CKPTD_DAEMON_ROOT or /var/lib/ckptd}/run/ckptd.sock)")
    g.add_argument("--root", default=d(None), metavar="DIR",
                   help="read a disk root directly, no daemon (a daemon root or its data/ directory)")
    g.add_argument("--bucket", default=d(None), metavar="BUCKET",
                   help="read an object store directly, no daemon (credentials: the standard AWS chain)")
    g.add_argument("--endpoint", default=d(None), metavar="URL", help="with --bucket: the S3 endpoint URL")
    g.add_argument("--preset", choices=("aws", "minio", "oss"), default=d(None),
                   help="with --bucket: the store's flavour (default: minio with --endpoint, else aws)")
    g.add_argument("--prefix", default=d(None), metavar="PREFIX", help="with --bucket: the key prefix")
    g.add_argument("--region", default=d(None), metavar="REGION", help="with --bucket: the region")
    g.add_argument("-o", "--output", choices=("table", "json"), default=d("table"), help="output format")
    g.add_argument("--json", dest="output", action="store_const", const="json", default=d("table"),
                   help="same as -o json")
    g.add_argument("--timeout", type=_positive_float, default=d(None), metavar="SECONDS",
                   help="deadline of each daemon call (default: 60, and 600 for calls that read a shard)")
    g.add_argument("--no-progress", action="store_true", default=d(False),
                   help="never draw a progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ckptctl", description="Inspect, restore, verify and clean ckptd checkpoints.",
                epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 partial, 4 not found, 5 integrity failure, "
                       "6 daemon unavailable, 7 timeout, 130 interrupted. Reference: docs/cli.md")
    p.add_argument("--version", action="version", version=f"ckptctl {__version__}")
    _add_common(p, suppress=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    def cmd(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        _add_common(sp, suppress=True)
        return sp

    cmd("version", "print the client's (and the daemon's) version")
    cmd("status", "daemon health, tier capacity and usage, in-flight saves, latest step per tier per job")
    s = cmd("ls", "list steps with their state at each tier")
    s.add_argument("job", nargs="?", metavar="JOB")
    s = cmd("show", "describe a step from its manifest (never reads tensor bytes)")
    s.add_argument("ident", metavar="JOB@STEP", help="JOB@STEP, JOB@latest or JOB (= latest)")
    s.add_argument("--tensors", action="store_true", help="list every tensor (name, dtype, shape, bytes)")
    s = cmd("restore", "write a step as safetensors (or torch) files plus manifest.json")
    s.add_argument("ident", metavar="JOB@STEP", help="JOB@STEP, JOB@latest or JOB (= latest)")
    s.add_argument("--to", type=Path, metavar="DIR", help="output directory (created if missing)")
    s.add_argument("--format", choices=("safetensors", "torch"), default="safetensors")
    s.add_argument("--dry-run", action="store_true", help="print which tier would serve each shard; read nothing")
    s.add_argument("--rank", type=_rank, help="restore only this rank")
    s.add_argument("--force", action="store_true", help="overwrite existing files in DIR")
    s = cmd("export", "write a step's model as safetensors (sharded, with an index) or torch files, "
                      "consolidated across ranks, plus its other state as JSON")
    s.add_argument("ident", metavar="JOB@STEP", help="JOB@STEP, JOB@latest or JOB (= latest)")
    s.add_argument("--to", type=Path, metavar="DIR", required=True, help="output directory (created if missing)")
    s.add_argument("--format", choices=("safetensors", "torch"), default="safetensors")
    s.add_argument("--model-key", metavar="KEY", help="the top-level key holding the model's state_dict "
                                                       "(default: model, else state_dict)")
    s.add_argument("--max-shard-size", type=_size, default=5 * 2**30, metavar="SIZE",
                   help="split safetensors files above this size, with an index JSON (default 5GiB)")
    s.add_argument("--memory-limit", type=_size, default=256 * 2**20, metavar="SIZE",
                   help="most bytes held at once while streaming (default 256MiB; at least one checksum chunk)")
    s.add_argument("--force", action="store_true", help="overwrite existing files in DIR")
    s = cmd("verify", "check manifests and (with --read-data) every crc32c chunk of every copy")
    s.add_argument("ident", metavar="JOB@STEP", help="JOB@STEP, JOB@latest or JOB (= latest)")
    s.add_argument("--tier", choices=("memory", "disk", "object"),
                   help="check only this tier (default: every committed tier)")
    s.add_argument("--read-data", action="store_true", help="re-read every byte and check crc32c")
    s = cmd("gc", "apply the retention policy now (pinned and latest steps are kept)")
    s.add_argument("job", nargs="?", metavar="JOB")
    s.add_argument("--tier", choices=("disk", "object"), help="only this tier (default: every tier with a policy)")
    s.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    s.add_argument("--max-to-keep", type=_count, metavar="N",
                   help="with --root/--bucket: keep the newest N committed steps (default 3)")
    s.add_argument("--keep-period", type=_rank, metavar="P",
                   help="with --root/--bucket: also keep every step divisible by P (default 0: off)")
    s = cmd("rm", "remove a step at one tier, or at every tier that holds it")
    s.add_argument("ident", metavar="JOB@STEP")
    s.add_argument("--tier", choices=("memory", "disk", "object"), help="only this tier (default: every tier)")
    s.add_argument("--yes", action="store_true", help="confirm the removal (required unless --dry-run)")
    s.add_argument("--force", action="store_true",
                   help="also remove the last committed copy of a pinned or the latest step")
    s.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    s = cmd("release-memory", "free the shared-memory slots a stopped daemon left (needs --root)")
    s.add_argument("--shm-dir", type=Path, metavar="DIR",
                   help="the daemon's daemon.shm_dir (default: the one derived from --root)")
    s.add_argument("--force", action="store_true", help="also free slots whose shards are not durable on disk")
    s.add_argument("--dry-run", action="store_true", help="say what would be freed; free nothing")
    for name, what in (("pin", "pin a step: retention never removes it"), ("unpin", "unpin a step")):
        s = cmd(name, what)
        s.add_argument("ident", metavar="JOB@STEP", help="JOB@STEP, JOB@latest or JOB (= latest)")
    return p


def _run(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ckptd.ctl import inspect
    from ckptd.ctl.bucket import BucketTarget
    from ckptd.ctl.model import parse_identity
    from ckptd.ctl.source import open_source

    if sum(t is not None for t in (ns.addr, ns.root, ns.bucket)) > 1:
        parser.error("--addr, --root and --bucket exclude each other")
    bucket_opts = [f"--{o}" for o in ("endpoint", "preset", "prefix", "region") if getattr(ns, o) is not None]
    if bucket_opts and ns.bucket is None:
        parser.error(f"{', '.join(bucket_opts)} need --bucket")
    as_json = ns.output == "json"
    progress = not as_json and not ns.no_progress and sys.stderr.isatty()
    if ns.cmd == "version":
        return inspect.run_version(ns.addr, ns.timeout, as_json, use_daemon=ns.root is None and ns.bucket is None)
    if ns.cmd == "release-memory":
        if ns.root is None:
            parser.error("release-memory needs --root DIR (the root of a stopped daemon)")
        from ckptd.ctl.admin import run_release_memory

        return run_release_memory(Path(ns.root), ns.shm_dir, ns.force, ns.dry_run, as_json)
    ident = parse_identity(ns.ident) if hasattr(ns, "ident") else None
    if ns.cmd in ("ls", "gc") and ns.job is not None:
        parse_identity(ns.job)  # validates the job name (exit 2 on a bad one)
    if ns.cmd == "restore" and not ns.dry_run and ns.to is None:
        parser.error("restore needs --to DIR (or --dry-run)")
    if ns.cmd == "rm" and ident is not None and ident.step is None:
        parser.error(f"rm needs an explicit step ({ident.job}@STEP), not {ns.ident}")
    if ns.cmd == "rm" and not ns.yes and not ns.dry_run:
        parser.error("rm removes checkpoint data: confirm with --yes (or preview with --dry-run)")
    bucket = None if ns.bucket is None else BucketTarget(ns.bucket, ns.endpoint, ns.preset, ns.prefix, ns.region)
    source = open_source(ns.addr, ns.root, ns.timeout, bucket)
    try:
        if ns.cmd == "status":
            return inspect.run_status(source, as_json)
        if ns.cmd == "ls":
            return inspect.run_ls(source, ns.job, as_json)
        if ns.cmd == "gc":
            from ckptd.ctl.admin import run_gc

            return run_gc(source, ns.job, ns.tier, ns.dry_run, ns.max_to_keep, ns.keep_period, as_json)
        assert ident is not None
        if ns.cmd == "rm":
            from ckptd.ctl.admin import run_rm

            return run_rm(source, ident, ns.tier, ns.force, ns.dry_run, as_json)
        if ns.cmd in ("pin", "unpin"):
            from ckptd.ctl.admin import run_pin

            return run_pin(source, ident, ns.cmd == "pin", as_json)
        if ns.cmd == "show":
            return inspect.run_show(source, ident, ns.tensors, as_json)
        if ns.cmd == "restore":
            from ckptd.ctl import restore

            if ns.dry_run:
                return restore.run_dry_run(source, ident, ns.rank, as_json)
            return restore.run_restore(source, ident, ns.to, ns.format, ns.rank, ns.force, as_json, progress)
        if ns.cmd == "export":
            from ckptd.ctl.export import run_export

            return run_export(source, ident, ns.to, ns.format, ns.model_key, ns.max_shard_size, ns.memory_limit,
                              ns.force, as_json, progress)
        if ns.cmd == "verify":
            from ckptd.ctl.verify import run_verify

            return run_verify(source, ident, ns.tier, ns.read_data, as_json, progress)
        raise AssertionError(f"unhandled command {ns.cmd}")
    finally:
        source.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        return _run(ns, parser)
    except KeyboardInterrupt:
        message("interrupted")
        return EXIT_INTERRUPTED
    except CkptdError as exc:
        message(f"error: {exc}")
        return exc.exit_code
    except BrokenPipeError:
        # the reader went away (e.g. `ckptctl ls | head`): stay quiet on the way out
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except OSError as exc:
        message(f"error: {exc}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
