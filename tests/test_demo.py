"""The demo (examples/demo.py), shortened: train, SIGKILL the trainers, resume, compare.

Runs the real thing as a subprocess (a ckptd daemon, two gloo trainer processes, a restart and
an uninterrupted reference run) and checks its last line: the resumed run restored from the
daemon's memory tier, lost no step, and ended bit-identical to the reference. With ``--nodes 2``
(two daemons, node n2 lost at the kill) rank 1 restores from its replica on n1 instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo.py"


@pytest.mark.timeout(300)
def test_demo_resumes_bit_identical_from_memory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--steps", "12", "--kill-at", "6", "--root", str(root)],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr}"
    context = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    summary = json.loads(lines[-1])
    assert summary["identical"] is True, context
    assert summary["steps_lost"] == 0, context
    assert summary["restored_from"] == "memory", context
    assert summary["restored_step"] == summary["completed_before_kill"] == 6, context
    assert summary["stall_ms_median"] > 0 and summary["restore_ms"] > 0, context
    assert proc.returncode == 0, context
    # Everything the daemon owned is gone: no process left, its private shm directory removed.
    assert "ckptd stopped (exit code 0)" in proc.stdout, context
    assert not list(Path("/dev/shm").glob(f"ckptd-demo-{summary['job'].removeprefix('demo-')}*"))


@pytest.mark.timeout(300)
def test_demo_two_nodes_lose_one_and_restore_from_the_peer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--nodes", "2", "--steps", "12", "--kill-at", "6", "--root", str(root)],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr}"
    context = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    summary = json.loads(lines[-1])
    assert summary["identical"] is True, context
    assert summary["steps_lost"] == 0, context
    assert summary["nodes"] == 2 and summary["lost_node"] == "n2", context
    # rank 0's node survived (its memory tier); rank 1's node was lost (its replica on n1)
    assert summary["restored_from_per_rank"] == ["memory", "peer"], context
    assert summary["restored_from"] == "memory+peer", context
    assert summary["restored_step"] == summary["completed_before_kill"] == 6, context
    assert proc.returncode == 0, context
    # Both daemons stopped (the lost one was SIGKILLed), every private shm directory removed.
    assert "ckptd n1 stopped (exit code 0)" in proc.stdout, context
    assert "ckptd n2 stopped (exit code 0)" in proc.stdout, context
    assert "ckptd n2 (lost) stopped" in proc.stdout, context
    assert not list(Path("/dev/shm").glob(f"ckptd-demo-{summary['job'].removeprefix('demo-')}*"))
