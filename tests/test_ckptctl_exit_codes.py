"""ckptctl's fixed exit codes, driven as a subprocess.

Protects the documented codes: 2 usage (bad identities, checked before any connection, and bad
command lines; ``--tier memory`` without a daemon), 4 not found (through a daemon and on a bare
root), 6 daemon unavailable (a missing or stale socket, from ``--addr``, ``CKPTD_ADDR`` or
``CKPTD_DAEMON_ROOT``, within seconds; a listener that never answers, after a short timeout),
7 timed out (a daemon slower than ``--timeout``) and 130 interrupted (Ctrl-C while waiting). A
failing command writes nothing to stdout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests._ckptctl_kit import (
    CTL,
    JOB,
    Saved,
    ctl,
)


# -- exit codes ----------------------------------------------------------------------------
def test_not_found_exits_4(saved: Saved, tmp_path: Path) -> None:
    for args in (["show", f"{JOB}@999"], ["show", "nojob@1"], ["ls", "nojob"], ["verify", f"{JOB}@15"],
                 ["restore", f"{JOB}@999", "--to", str(tmp_path / "o")], ["restore", f"{JOB}@999", "--dry-run"]):
        res = ctl(*args, *saved.addr())
        assert res.returncode == 4, (args, res.stderr)
        assert res.stdout == ""
    saved.daemon.terminate()
    root = ["--root", str(saved.daemon.root)]
    for args in (["show", f"{JOB}@999"], ["show", "nojob@latest"], ["ls", "nojob"], ["verify", f"{JOB}@15"]):
        assert ctl(*args, *root).returncode == 4, args
    assert ctl("ls", "--root", str(tmp_path / "no-such-dir")).returncode == 4


def test_no_daemon_exits_6(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    cases: list[tuple[list[str], dict[str, str]]] = [
        (["ls", "--addr", str(tmp_path / "missing.sock")], {}),
        (["status", "--addr", f"unix:{stale}"], {}),
        (["show", f"{JOB}@1"], {"CKPTD_ADDR": str(tmp_path / "env.sock")}),
        (["restore", f"{JOB}@1", "--to", str(tmp_path / "o")], {"CKPTD_DAEMON_ROOT": str(tmp_path)}),
    ]
    for args, env in cases:
        t0 = time.monotonic()
        res = ctl(*args, env=env)
        assert res.returncode == 6, (args, res.stderr)
        assert "no ckptd daemon" in res.stderr and res.stdout == ""
        assert time.monotonic() - t0 < 10


def test_silent_listener_exits_6_after_short_timeout(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])  # accept, never speak HTTP/2
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        res = ctl("ls", "--addr", str(path))
        assert res.returncode == 6 and 2.5 < time.monotonic() - t0 < 15
        # and Ctrl-C while it waits: 130
        seen = len(conns)
        # Ctrl-C as a terminal's foreground process gets it: a suite run as a background job of a
        # non-interactive shell has SIGINT ignored, and a child inherits that (Python then installs
        # no KeyboardInterrupt handler), so the child puts the default handler back first
        foreground = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "from ckptd.ctl.main import main; sys.exit(main(sys.argv[1:]))")
        p = subprocess.Popen([sys.executable, "-c", foreground, "ls", "--addr", str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60  # its imports take seconds on a loaded host: signal it once it waits
        while len(conns) == seen and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130, err
        assert "interrupted" in err
    finally:
        stop.set()
        th.join()
        for c in conns:
            c.close()
        srv.close()


def test_slow_daemon_exits_7(tmp_path: Path) -> None:
    from concurrent import futures

    import grpc

    from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
    from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc

    class Slow(pb_grpc.CheckpointServiceServicer):
        def ListJobs(self, request: Any, context: Any) -> Any:
            time.sleep(3)
            return pb.ListJobsResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CheckpointServiceServicer_to_server(Slow(), server)
    path = tmp_path / "slow.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        res = ctl("ls", "--addr", str(path), "--timeout", "0.5")
        assert res.returncode == 7, res.stderr
    finally:
        server.stop(0)


@pytest.mark.parametrize("ident", ["job@-3", "../x@1", "job@", "@1", "a@b@c", "job@1.5", "job@+3", "j/b@1",
                                   "job@latest2", "-job@1"])
def test_bad_identity_exits_2(ident: str, tmp_path: Path) -> None:
    # identities are checked before any connection: no daemon is needed for exit 2
    res = ctl("show", "--addr", str(tmp_path / "none.sock"), "--", ident)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("args", [[], ["bogus"], ["ls", "--bogus"], ["restore", "job@1"],
                                  ["--addr", "x.sock", "--root", "/tmp", "ls"], ["ls", "../x"],
                                  ["verify", "job@1", "--tier", "tape"], ["restore", "job@1", "--rank", "-1"],
                                  ["-o", "yaml", "ls"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    res = ctl(*args)
    assert res.returncode == 2, (args, res.stderr)
    assert res.stdout == ""


def test_memory_tier_needs_a_daemon(saved: Saved) -> None:
    saved.daemon.terminate()
    assert ctl("verify", f"{JOB}@20", "--tier", "memory", "--root", str(saved.data)).returncode == 2


def test_output_into_a_closed_pipe_prints_no_traceback(saved: Saved) -> None:
    """`ckptctl ls | head -1` after head exited: a quiet exit 1, no BrokenPipeError traceback."""
    for args in (["ls", *saved.addr()], ["ls", "-o", "json", *saved.addr()], ["--help"]):
        r, w = os.pipe()
        os.close(r)
        try:
            res = subprocess.run([*CTL, *args], stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(w)
        assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, (args, res.stderr)
        assert res.returncode == (0 if args == ["--help"] else 1), (args, res.returncode)
