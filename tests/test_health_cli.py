"""``ckptd health --socket PATH``: the exec probe of the Kubernetes DaemonSet
(deploy/kubernetes/base/daemonset.yaml). Exit 0 while a real daemon's grpc.health.v1 says
SERVING; one line on stderr and exit 1 for an unknown service, a stopped daemon or no socket."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DaemonProc


def _health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptd.daemon.cli", "health", *args],
                          capture_output=True, text=True, timeout=60)


def test_health_serving_then_stopped(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory()
    ok = _health("--socket", str(d.socket), "--timeout-s", "5")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "" and ok.stderr == ""
    assert _health("--socket", f"unix:{d.socket}").returncode == 0  # the unix: form is accepted too
    assert _health("--socket", str(d.socket), "--service", "ckptd.v1.CheckpointService").returncode == 0

    unknown = _health("--socket", str(d.socket), "--service", "no.such.Service")
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1 and "NOT_FOUND" in unknown.stderr, unknown.stderr

    assert d.terminate() == 0
    stopped = _health("--socket", str(d.socket), "--timeout-s", "2")
    assert stopped.returncode == 1
    lines = stopped.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptd: health: unix:"), stopped.stderr
    assert "UNAVAILABLE" in lines[0] or "DEADLINE_EXCEEDED" in lines[0], lines[0]


def test_health_without_a_socket(tmp_path: Path) -> None:
    r = _health("--socket", str(tmp_path / "missing.sock"), "--timeout-s", "1")
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and str(tmp_path / "missing.sock") in r.stderr, r.stderr
    assert _health("--socket", str(tmp_path / "x.sock"), "--timeout-s", "0").returncode == 2
