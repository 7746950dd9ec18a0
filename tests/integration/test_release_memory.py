"""Shared memory a daemon leaves behind: slots outlive a clean stop on purpose (re-adoption), and
are freed on request: ``ckptd serve --release-memory-on-exit`` frees those whose shards are durable
on disk at a clean stop, ``ckptctl --root DIR release-memory`` frees them once the daemon stopped
(refused while it serves the root), ``--force`` also frees shards not on disk. A test daemon
dies with its test process, even one killed with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests._ckptd_helpers import clean_env
from tests.conftest import DaemonProc

CTL = [sys.executable, "-m", "ckptd.ctl.main"]


def _save(d: DaemonProc, steps: list[int], level: Level) -> None:
    with CheckpointManager("rel", rank=0, world_size=1, addr=d.addr, on_error="raise") as m:
        for step in steps:
            m.save(step, {"w": np.full(100_000, step, dtype=np.float32)}).wait(level, timeout_s=60)


def _slots(d: DaemonProc) -> list[str]:
    return sorted(p.name for p in d.shm_dir.glob("slot-*.bin")) if d.shm_dir.exists() else []


def _ctl(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, "--root", str(d.root), "release-memory", "--shm-dir", str(d.shm_dir), *args],
                          capture_output=True, text=True, timeout=60, env=clean_env())


def _doc(d: DaemonProc, *args: str) -> Any:
    res = _ctl(d, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_slots_outlive_a_clean_stop_by_default(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory()
    _save(d, [1, 2], Level.LOCAL_DURABLE)
    assert d.terminate() == 0
    assert _slots(d)  # kept for the next daemon to adopt


def test_release_memory_on_exit_frees_durable_slots(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(extra_args=["--release-memory-on-exit"])
    _save(d, [1, 2], Level.LOCAL_DURABLE)
    assert _slots(d)
    assert d.terminate() == 0
    assert _slots(d) == [] and not d.shm_dir.exists(), list(d.shm_dir.iterdir())
    assert "released" in d.log()


def test_release_memory_on_exit_keeps_what_is_not_on_disk(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(extra_args=["--no-disk"], env={"CKPTD_DAEMON_RELEASE_MEMORY_ON_EXIT": "durable"})
    _save(d, [1], Level.STAGED)
    assert d.terminate() == 0
    kept = _slots(d)
    assert kept  # the only copy of step 1: never freed without --force


def test_ckptctl_release_memory(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory()
    _save(d, [1, 2], Level.LOCAL_DURABLE)
    res = _ctl(d)
    assert res.returncode == 1 and "serving" in res.stderr  # the daemon uses them
    assert d.terminate() == 0
    before = _slots(d)
    plan = _doc(d, "--dry-run")
    assert plan["schema"] == "ckptctl.release-memory/v1" and plan["dry_run"]
    assert sorted(r["slot"] for r in plan["freed"]) == before and plan["kept"] == []
    assert _slots(d) == before  # a dry run frees nothing
    done = _doc(d)
    assert done["freed_bytes"] == plan["freed_bytes"] > 0 and done["dir_removed"]
    assert not d.shm_dir.exists()
    # the daemon starts again without them (from disk)
    d2 = daemon_factory(root=d.root, shm_dir=d.shm_dir)
    with CheckpointManager("rel", rank=0, world_size=1, addr=d2.addr, on_error="raise") as m:
        out: dict[str, Any] = {}
        assert m.restore(out) == 2 and out["w"][0] == 2


def test_ckptctl_release_memory_keeps_shards_not_on_disk_unless_forced(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(extra_args=["--no-disk"])
    _save(d, [1], Level.STAGED)
    assert d.terminate() == 0
    assert _slots(d)
    doc = _doc(d)
    assert all(r["why"] == "holds no shard" for r in doc["freed"])  # spares: empty
    assert [(r["job"], r["step"], r["why"]) for r in doc["kept"]] == [("rel", 1, "not durable on disk")]
    kept = [r["slot"] for r in doc["kept"]]
    assert _slots(d) == kept and not doc["dir_removed"]
    doc = _doc(d, "--force")
    assert [r["slot"] for r in doc["freed"]] == kept and not d.shm_dir.exists()
    assert os.path.exists(d.root / "ckptd.lock")


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped yet is dead too
    except FileNotFoundError:
        return True


def test_a_test_daemon_dies_with_its_killed_parent(tmp_path: Path) -> None:
    script = (f"import sys, time\nfrom pathlib import Path\nfrom tests._ckptd_helpers import running_daemon\n"
              f"with running_daemon(Path({str(tmp_path)!r})) as d:\n"
              f"    print(d.proc.pid, d.shm_dir, flush=True)\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=clean_env(),
                              cwd=Path(__file__).resolve().parents[2])
    assert parent.stdout is not None
    pid_text, shm = parent.stdout.readline().split()
    pid = int(pid_text)
    try:
        assert not _dead(pid)
        parent.kill()  # SIGKILL: no cleanup runs in the parent
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not _dead(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _dead(pid), "the daemon outlived its killed parent"
    finally:
        if not _dead(pid):
            os.kill(pid, 9)
        shutil.rmtree(shm, ignore_errors=True)
