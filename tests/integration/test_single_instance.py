"""One daemon per socket path: a second ``ckptd serve`` on the socket of a live daemon (with
another root) is refused and names the other daemon; the live daemon keeps its socket. A socket
file left by a dead daemon is still replaced."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from ckptd_client.rpc import wait_until_serving

from tests.conftest import DaemonProc


def _serve(root: Path, sock: Path, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    shm = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:10]}"
    try:
        return subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--root", str(root),
                               "--socket", str(sock), "--shm-dir", str(shm), "--budget-bytes", "64MiB"],
                              capture_output=True, text=True, timeout=timeout_s)
    finally:
        subprocess.run(["rm", "-rf", str(shm)], check=False)


def test_second_daemon_on_a_live_socket_is_refused_and_names_the_first(
        daemon_factory: Callable[..., DaemonProc], tmp_path: Path) -> None:
    first = daemon_factory()
    res = _serve(tmp_path / "other-root", first.socket)
    assert res.returncode == 1, res.stderr
    assert str(first.proc.pid) in res.stderr, res.stderr
    assert str(first.root) in res.stderr, res.stderr
    assert first.socket.is_socket()  # not unlinked by the refused daemon
    wait_until_serving(first.socket, 5.0)  # the first daemon still answers on it
    assert first.alive()


def test_stale_socket_of_a_dead_daemon_is_replaced(daemon_factory: Callable[..., DaemonProc]) -> None:
    first = daemon_factory()
    first.kill()  # leaves its socket file and its lock file behind
    assert first.socket.is_socket()
    second = daemon_factory(extra_args=["--socket", str(first.socket)], wait=False)
    wait_until_serving(first.socket, 20.0, exit_code=second.proc.poll)
    assert second.alive()


def test_socket_file_nobody_listens_on_is_replaced(daemon_factory: Callable[..., DaemonProc], tmp_path: Path) -> None:
    path = Path("/tmp") / f"ckt-{uuid.uuid4().hex[:8]}.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file with no listener (no lock file either)
    try:
        d = daemon_factory(extra_args=["--socket", str(path)], wait=False)
        wait_until_serving(path, 20.0, exit_code=d.proc.poll)
    finally:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".lock").unlink(missing_ok=True)
