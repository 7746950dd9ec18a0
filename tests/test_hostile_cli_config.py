"""Hostile config files, environment values and command lines (``ckptd serve`` and ``ckptctl``).

Every case is refused with its documented outcome: a config error is ``InvalidArgument`` naming the
key (``ckptd serve`` exits 2 with "config error" and no traceback), a bad ``ckptctl`` argument is
a usage error (exit 2) reported before any connection. Covered here beyond tests/test_config.py and
tests/test_ckptctl*.py: a shared or foreign ``daemon.shm_dir`` (which the daemon would make private
and empty of every non-slot file), NUL characters, sizes too large for a float, TOML nested past the
parser's recursion limit, a config path that is a directory, tokens that are not strings or not
printable ASCII (never echoed), and identities, steps, timeouts and store options ``ckptctl`` must
refuse. The command-line cases call each command's ``main`` in process (an exception it does not
handle fails the test as a traceback would); one ``ckptd serve`` runs as a real process.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from ckptd.core.config import load
from ckptd.core.errors import InvalidArgument
from ckptd.ctl import main as ckptctl
from ckptd.daemon import cli as ckptd_cli
from tests._ckptd_helpers import clean_env

HUGE = "1" + "0" * 400  # an integer a float cannot hold
TOKEN = "hostile-config-token-5d1e0a77"


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory shared like /tmp (mode 1777) with another program's file in it."""
    d = Path(tempfile.mkdtemp(prefix="ckt-shared-", dir="/tmp"))
    os.chmod(d, 0o1777)
    (d / "other-program.dat").write_text("not ckptd's")
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


# -- config, in process --------------------------------------------------------------------------


def _cases(shared: Path, tmp: Path) -> list[tuple[str, dict[str, Any], str]]:
    """(id, load() arguments, pattern the InvalidArgument must match)."""
    root = tmp / "root"
    flags = lambda **kw: {"flags": kw}  # noqa: E731
    daemon = lambda **kw: flags(daemon=kw)  # noqa: E731
    peers = lambda **kw: flags(peers={"listen": "127.0.0.1:0", **kw})  # noqa: E731
    return [
        ("shm-dev-shm", daemon(root=str(root), shm_dir="/dev/shm"), r"daemon\.shm_dir /dev/shm is a shared"),
        ("shm-tmp", daemon(root=str(root), shm_dir="/tmp"), r"daemon\.shm_dir /tmp (is a shared|must be)"),
        ("shm-shared", daemon(root=str(root), shm_dir=str(shared)), r"shared directory \(mode 1777\)"),
        ("shm-slash", daemon(root=str(root), shm_dir="/"), r"daemon\.shm_dir / must be a directory of ckptd's own"),
        ("shm-home", daemon(root=str(root), shm_dir="~"), r"daemon\.shm_dir .* of ckptd's own"),
        ("shm-is-root", daemon(root=str(root), shm_dir=str(root)), r"daemon\.shm_dir .* holding daemon\.root"),
        ("shm-above-root", daemon(root=str(root), shm_dir=str(tmp)), r"daemon\.shm_dir .* holding daemon\.root"),
        ("shm-holds-socket", daemon(root=str(root), shm_dir="/tmp/ckt-x", socket="/tmp/ckt-x/s.sock"),
         r"daemon\.socket"),
        ("shm-env-dev-shm", {"env": {"CKPTD_DAEMON_SHM_DIR": "/dev/shm", "CKPTD_DAEMON_ROOT": str(root)}},
         r"daemon\.shm_dir /dev/shm is a shared"),
        ("nul-root", daemon(root="/tmp/a\x00b"), r"daemon\.root \(flag\): must not contain a NUL"),
        ("nul-socket", daemon(socket="/tmp/s\x00.sock"), r"daemon\.socket \(flag\): must not contain a NUL"),
        ("nul-shm", daemon(shm_dir="/dev/shm/a\x00"), r"daemon\.shm_dir \(flag\): must not contain a NUL"),
        ("nul-log-level", daemon(log_level="INFO\x00"), r"daemon\.log_level \(flag\): must not contain a NUL"),
        ("nul-node-id", peers(node_id="n\x00", token=TOKEN), r"peers\.node_id \(flag\): must not contain a NUL"),
        ("nul-bucket", flags(object={"bucket": "b\x00"}), r"object\.bucket \(flag\): must not contain a NUL"),
        ("nul-token", peers(token=TOKEN + "\x00"), r"peers\.token \(flag\): must not contain a NUL"),
        ("size-flag-overflow", flags(memory={"budget_bytes": HUGE + "MiB"}), r"memory\.budget_bytes \(flag\).*range"),
        ("size-env-overflow", {"env": {"CKPTD_MEMORY_CHUNK_BYTES": HUGE + ".5KiB"}}, r"memory\.chunk_bytes \(env\)"),
        ("size-peer-overflow", peers(token=TOKEN, max_inflight_bytes=HUGE + "TiB"), r"peers\.max_inflight_bytes"),
        ("token-int", peers(token=12345678901234567890), r"peers\.token \(flag\): expected a string, got int"),
        ("token-float", peers(token=1.5), r"peers\.token \(flag\): expected a string, got float"),
        ("token-bool", peers(token=True), r"peers\.token \(flag\): expected a string, got bool"),
        ("token-list", peers(token=[TOKEN]), r"peers\.token \(flag\): expected a string, got list"),
        ("token-unicode", peers(token="tökén-0123456789abcdef"), r"peers\.token must be printable ASCII"),
        ("token-control", peers(token="token\x07with-a-bell-inside"), r"peers\.token must be printable ASCII"),
        ("token-env-unicode", {"env": {"CKPTD_PEERS_LISTEN": "127.0.0.1:0", "CKPTD_PEERS_TOKEN": "ünïcode-token-0123"}},
         r"peers\.token must be printable ASCII"),
        ("threads-int64", daemon(io_threads=2**63), r"daemon\.io_threads"),
        ("timeout-huge", flags(memory={"wait_timeout_s": 1e308}), r"memory\.wait_timeout_s"),
        ("timeout-negative-zero-ok-but-nan", flags(memory={"lease_timeout_s": float("nan")}), r"lease_timeout_s"),
    ]


CASE_IDS = [c[0] for c in _cases(Path("/x"), Path("/y"))]


@pytest.mark.parametrize("case", CASE_IDS)
def test_hostile_config_values(shared_dir: Path, tmp_path: Path, case: str) -> None:
    _, kwargs, pattern = next(c for c in _cases(shared_dir, tmp_path) if c[0] == case)
    with pytest.raises(InvalidArgument, match=pattern) as info:
        load(None, env=kwargs.get("env", {}), flags=kwargs.get("flags"))
    for secret in (TOKEN, "12345678901234567890", "tökén", "ünïcode"):
        assert secret not in str(info.value)  # a token is never echoed, whatever was wrong with it
    assert sorted(p.name for p in shared_dir.iterdir()) == ["other-program.dat"]


BAD_TOML: list[tuple[str, str | bytes, str]] = [
    ("deep-arrays", "x = " + "[" * 100_000, "nested too deeply"),
    ("deep-inline-tables", "x = " + "{a = " * 100_000, "not valid TOML"),
    ("int-beyond-int64", "[daemon]\nio_threads = 99999999999999999999999999\n", r"daemon\.io_threads"),
    ("nul-escape-in-root", '[daemon]\nroot = "/tmp/a\\u0000b"\n', r"daemon\.root .*NUL"),
    ("raw-nul-byte", b"[daemon]\nroot = \"/tmp/a\x00b\"\n", "not valid TOML"),
    ("utf16-bom", "[memory]\n".encode("utf-16"), "not valid TOML"),
    ("token-as-table", f'[peers]\nlisten = "127.0.0.1:0"\ntoken = {{ value = "{TOKEN}" }}\n',
     "expected a string, got dict"),
    ("section-is-array", "[[memory]]\nbudget_bytes = 1\n", r"\[memory\] must be a table"),
    ("subtable", "[memory.extra]\nx = 1\n", r"memory\.extra"),
]


@pytest.mark.parametrize("text,pattern", [(t, p) for _, t, p in BAD_TOML], ids=[i for i, _, _ in BAD_TOML])
def test_hostile_config_files(tmp_path: Path, text: str | bytes, pattern: str) -> None:
    path = tmp_path / "ckptd.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(InvalidArgument, match=pattern) as info:
        load(path, env={})
    assert TOKEN not in str(info.value)


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read config file .*: Is a directory"):
        load(tmp_path, env={})
    assert load(Path("/dev/null"), env={}) == load(None, env={})  # an empty file is the defaults


# -- ckptd serve, as a subprocess ----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    args: list[str]
    rc: int
    fragment: str = ""
    env: tuple[tuple[str, str], ...] = ()
    absent: str = ""  # must appear in neither stdout nor stderr


def _in_process(main: Callable[[list[str]], int], r: Run, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Run a command's ``main`` here (no interpreter start-up per case); return its exit code and output.
    An exception it does not handle propagates and fails the test, as a traceback would."""
    out, err = io.StringIO(), io.StringIO()
    with monkeypatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("CKPTD_")]:
            mp.delenv(key)
        mp.setenv("NO_COLOR", "1")
        for key, value in r.env:
            mp.setenv(key, value)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                rc = main(list(r.args))
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return rc, out.getvalue() + err.getvalue()


def _all(main: Callable[[list[str]], int], runs: list[Run], monkeypatch: pytest.MonkeyPatch) -> None:
    bad = []
    for r in runs:
        rc, out = _in_process(main, r, monkeypatch)
        if rc != r.rc or r.fragment not in out or (r.absent and r.absent in out):
            bad.append((r.args[:4], r.rc, rc, out[-300:]))
    assert bad == [], bad


def serve_runs(tmp: Path, shared: Path) -> list[Run]:
    cfg = tmp / "cfg"
    cfg.mkdir()
    files = {
        "deep.toml": "x = " + "[" * 100_000,
        "nul.toml": '[daemon]\nroot = "/tmp/a\\u0000b"\n',
        "token-int.toml": '[peers]\nlisten = "127.0.0.1:0"\ntoken = 31415926535897932384626\n',
        "token-unicode.toml": '[peers]\nlisten = "127.0.0.1:0"\ntoken = "tökén-0123456789abcdef"\n',
        "token-ok.toml": f'[peers]\nlisten = "127.0.0.1:0"\ntoken = "{TOKEN}"\n',
    }
    for name, text in files.items():
        (cfg / name).write_text(text)
    root = ["--root", str(tmp / "root")]
    check = ["serve", "--check", *root]
    return [
        Run([*check, "--shm-dir", "/dev/shm"], 2, "daemon.shm_dir /dev/shm is a shared directory"),
        Run([*check, "--shm-dir", str(shared)], 2, "is a shared directory"),
        Run([*check, "--shm-dir", "/"], 2, "of ckptd's own"),
        Run([*check, "--shm-dir", str(tmp / "root")], 2, "holding daemon.root"),
        Run([*check, "--budget-bytes", HUGE + "MiB"], 2, "out of range"),
        Run([*check, "--budget-bytes", "0"], 2, "memory.budget_bytes must be positive"),
        Run([*check, "--budget-bytes", "-1GiB"], 2, "budget"),
        Run([*check, "--budget-bytes", "1"], 2, "memory.budget_bytes must be at least"),
        Run([*check, "--log-level", "TRACE"], 2, "daemon.log_level"),
        Run([*check, "--socket", ""], 2, "daemon.socket"),
        Run(["serve", "--check", "--root", ""], 2, "daemon.root"),
        Run([*check, "--config", str(cfg)], 2, "cannot read config file"),
        Run([*check, "--config", str(cfg / "deep.toml")], 2, "nested too deeply"),
        Run([*check, "--config", str(cfg / "nul.toml")], 2, "NUL"),
        Run([*check, "--config", str(cfg / "token-int.toml")], 2, "value not shown", absent="31415926535"),
        Run([*check, "--config", str(cfg / "token-unicode.toml")], 2, "printable ASCII", absent="tökén"),
        Run([*check, "--config", str(cfg / "missing.toml")], 2, "does not exist"),
        Run([*check, "--config", "/dev/null"], 0, "[daemon]"),
        Run([*check, "--config", str(cfg / "token-ok.toml")], 0, 'token = "<redacted>"', absent=TOKEN),
        Run([*check], 2, "daemon.shm_dir", env=(("CKPTD_DAEMON_SHM_DIR", "/dev/shm"),)),
        Run([*check], 2, "memory.budget_bytes (env)", env=(("CKPTD_MEMORY_BUDGET_BYTES", HUGE),)),
        Run([*check], 2, "peers.token", env=(("CKPTD_PEERS_LISTEN", "127.0.0.1:0"),
                                             ("CKPTD_PEERS_TOKEN", "short"))),
        Run(["serve", "--bogus"], 2, "unrecognized arguments"),
        Run(["serve", "--budget-bytes"], 2, "expected one argument"),
        Run(["bogus"], 2, "invalid choice"),
        Run([], 2, "required"),
    ]


def test_ckptd_serve_refuses_hostile_config_and_flags(tmp_path: Path, shared_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runs = serve_runs(tmp_path, shared_dir)
    # every run either fails argument parsing or only checks the config: none may start serving here
    assert all("--check" in r.args or r.rc == 2 and "--check" not in r.args and "--root" not in r.args for r in runs)
    _all(ckptd_cli.main, runs, monkeypatch)


def test_serve_never_empties_a_shared_shm_directory(tmp_path: Path, shared_dir: Path) -> None:
    """Before daemon.shm_dir was checked, this made the directory 0700 and deleted the file in it."""
    res = subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--root", str(tmp_path / "root"),
                          "--socket",
                          str(tmp_path / "s.sock"), "--shm-dir", str(shared_dir)], capture_output=True, text=True,
                         timeout=60, env=clean_env())
    assert res.returncode == 2 and "config error" in res.stderr, res
    assert stat.S_IMODE(shared_dir.stat().st_mode) == 0o1777
    assert (shared_dir / "other-program.dat").read_text() == "not ckptd's"
    assert not (tmp_path / "root").exists()  # nothing started


# -- ckptctl, as a subprocess --------------------------------------------------------------------


def ctl_runs(tmp: Path) -> list[Run]:
    none = ["--addr", str(tmp / "none.sock")]  # usage is checked before any connection: no daemon needed
    return [Run(args, 2, frag) for args, frag in [
        (["show", "job\udcff@1", *none], "bad identity"),  # non-UTF-8 argv byte
        (["show", "job@99999999999999999999999", *none], "out of range"),
        (["show", "job@1000000000000", *none], "out of range"),
        (["show", "job@\u0663", *none], "non-negative integer"),  # an Arabic-Indic digit int() would take
        (["show", "job@1_000", *none], "non-negative integer"),  # an underscore int() would take
        (["show", "job@ 1", *none], "non-negative integer"),
        (["show", "job@Latest", *none], "non-negative integer"),
        (["show", "/etc/passwd@1", *none], "bad identity"),
        (["show", "job\u202e@1", *none], "bad identity"),
        (["ls", "j" * 100_000, *none], "bad identity"),
        (["--timeout", "-1", "ls", *none], "--timeout"),
        (["--timeout", "nan", "ls", *none], "--timeout"),
        (["--timeout", "0", "ls", *none], "--timeout"),
        (["gc", "--max-to-keep", "-5", *none], "--max-to-keep"),
        (["gc", "--keep-period", "-1", *none], "--keep-period"),
        (["ls", "--bucket", "Bad_Bucket"], "not a valid bucket name"),
        (["ls", "--bucket", "ok-bucket", "--endpoint", "file:///etc/passwd"], "endpoint_url"),
        (["ls", "--bucket", "ok-bucket", "--prefix", "../.."], "object.prefix"),
        (["ls", "--bucket", "ok-bucket", "--preset", "gcs"], "--preset"),
        (["verify", "job@1", "--tier", "../disk", *none], "--tier"),
        (["rm", "job@1", "--tier", "", "--yes", *none], "--tier"),
        (["restore", "job@1", "--to", str(tmp / "o"), "--format", "pickle", *none], "--format"),
        (["-o", "", "ls", *none], "-o/--output"),
        (["ls", "--root", str(tmp), *none], ""),  # two targets
    ]]


def test_ckptctl_refuses_hostile_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _all(ckptctl.main, ctl_runs(tmp_path), monkeypatch)


def test_ckptctl_infinite_timeout_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
    from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc

    class Quick(pb_grpc.CheckpointServiceServicer):
        def ListJobs(self, request: Any, context: Any) -> Any:
            return pb.ListJobsResponse()

        def DaemonStatus(self, request: Any, context: Any) -> Any:
            return pb.DaemonStatusResponse(version="0")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CheckpointServiceServicer_to_server(Quick(), server)
    path = tmp_path / "quick.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        rc, out = _in_process(ckptctl.main, Run(["--timeout", "30", "ls", "--addr", str(path)], 0), monkeypatch)
        assert rc == 0, out  # the fake daemon answers
        _all(ckptctl.main, [Run(["--timeout", t, "ls", "--addr", str(path)], 2, "--timeout")
                            for t in ("inf", "1e400")], monkeypatch)
    finally:
        server.stop(0)
