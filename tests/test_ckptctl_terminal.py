"""ckptctl on a terminal and as a program, driven as a subprocess.

Protects the progress bar on a terminal only: ``restore``, ``export`` and ``verify --read-data`` draw it on
stderr when that is a terminal, never when piped, never in JSON mode, never with
``--no-progress``; styled output is honoured only without ``NO_COLOR``; the ``ckptctl`` console
script and ``python -m ckptd.ctl.main`` give the same result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests._ckptctl_kit import (
    CTL,
    JOB,
    Saved,
    ctl,
    ctl_json,
)


# -- terminal behaviour --------------------------------------------------------------------
def run_on_pty(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ckptctl with stderr on a pseudo-terminal (stdout piped); return (rc, stdout, terminal text)."""
    master, slave = os.openpty()
    full = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    full.update(env or {})
    p = subprocess.Popen([*CTL, *args], stdout=subprocess.PIPE, stderr=slave, env=full)
    os.close(slave)
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, chunks), daemon=True)
    reader.start()
    out, _ = p.communicate(timeout=120)
    reader.join(10)
    os.close(master)
    return p.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO once the child closed the terminal
            return
        if not data:
            return
        chunks.append(data)


def test_progress_bar_only_on_a_terminal(saved: Saved, tmp_path: Path) -> None:
    rc, out, term = run_on_pty(["restore", f"{JOB}@20", "--to", str(tmp_path / "tty"), *saved.addr()])
    assert rc == 0, term
    assert f"restore {JOB}@20" in term and "100%" in term and "ETA" in term and "/s" in term and "\r" in term
    assert "ETA" not in out  # the bar is on stderr only
    piped = ctl("restore", f"{JOB}@20", "--to", str(tmp_path / "pipe"), *saved.addr())
    assert piped.returncode == 0 and "ETA" not in piped.stderr and "%" not in piped.stderr
    # never in JSON mode, never with --no-progress
    rc, out, term = run_on_pty(["restore", f"{JOB}@20", "--to", str(tmp_path / "json"), "-o", "json",
                                *saved.addr()])
    assert rc == 0 and "ETA" not in term and json.loads(out)["step"] == 20
    rc, _, term = run_on_pty(["restore", f"{JOB}@20", "--to", str(tmp_path / "np"), "--no-progress", *saved.addr()])
    assert rc == 0 and "ETA" not in term
    # verify --read-data and export draw one too
    rc, _, term = run_on_pty(["verify", f"{JOB}@20", "--read-data", *saved.addr()])
    assert rc == 0 and "ETA" in term and f"verify {JOB}@20" in term
    rc, _, term = run_on_pty(["export", f"{JOB}@20", "--to", str(tmp_path / "export"), *saved.addr()])
    assert rc == 0 and "ETA" in term and f"export {JOB}@20" in term and "100%" in term


def test_no_color_honoured(saved: Saved) -> None:
    master, slave = os.openpty()
    try:
        for env, styled in (({}, True), ({"NO_COLOR": "1"}, False)):
            full = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")} | env
            full["TERM"] = "xterm"
            p = subprocess.run([*CTL, "ls", *saved.addr()], stdout=slave, stderr=subprocess.PIPE, env=full,
                               timeout=60)
            assert p.returncode == 0
            data = os.read(master, 65536).decode()
            assert ("\x1b[" in data) is styled, data
    finally:
        os.close(slave)
        os.close(master)


def test_module_entry_point_and_console_script_agree(saved: Saved) -> None:
    script = Path(sys.executable).parent / "ckptctl"
    if not script.exists():
        pytest.skip("console script not installed")
    a = subprocess.run([str(script), "ls", "-o", "json", *saved.addr()], capture_output=True, text=True, timeout=60)
    assert a.returncode == 0
    assert json.loads(a.stdout) == ctl_json("ls", *saved.addr())
