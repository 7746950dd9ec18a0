"""Steps that never commit, and what a daemon restart reports about steps it knows only from disk.

- A save naming another world size than the job's committed steps is refused at BeginSave with a
  clear error (it could never commit with the job's other ranks), instead of staging a step that
  stays "in progress" forever.
- An uncommitted step (one rank saved, the other never did) is refused by ``ckptctl rm`` without
  ``--force`` and removed with it; a step committed nowhere and staged nowhere is NotFound.
- After a restart, a step known only from its disk manifest is listed with its real size and
  memory "removed", not "pending" (``ckptctl status`` does not count it as staging), and a step the
  disk drain had superseded before the restart is not written to disk after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
from ckptd_client import CheckpointManager, FailedPrecondition, Level

from tests.conftest import DaemonProc

CTL = [sys.executable, "-m", "ckptd.ctl.main"]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    return subprocess.run([*CTL, *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_save_with_another_world_size_is_refused(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory()
    with CheckpointManager("ws", rank=0, world_size=1, addr=d.addr) as m:
        m.save(1, {"x": np.arange(100)}).wait(Level.LOCAL_DURABLE, timeout_s=30)
    with CheckpointManager("ws", rank=0, world_size=2, addr=d.addr) as wrong:
        h = wrong.save(2, {"x": np.arange(100)})
    assert not h.ok and isinstance(h.error, FailedPrecondition), h.error
    assert "world_size 1" in str(h.error) and "world_size 2" in str(h.error)
    steps = json.loads(ctl("ls", "ws", "--addr", d.addr, "--json").stdout)["steps"]
    assert [s["step"] for s in steps] == [1]


def test_an_uncommitted_step_is_removed_only_with_force(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory()
    r0 = CheckpointManager("un", rank=0, world_size=2, addr=d.addr)
    assert r0.save(1, {"x": np.arange(100)}).ok  # rank 1 never saves step 1
    addr = ["--addr", d.addr]
    res = ctl("rm", "un@1", "--yes", *addr)
    assert res.returncode == 1 and "not committed" in res.stderr and "--force" in res.stderr, res
    doc = json.loads(ctl("rm", "un@1", "--yes", "--force", "--json", *addr).stdout)
    assert [(r["step"], r["tier"]) for r in doc["deleted"]] == [(1, "memory")]
    assert ctl("rm", "un@1", "--yes", "--force", *addr).returncode == 4  # nothing left: NotFound
    steps = json.loads(ctl("ls", "un", "--addr", d.addr, "--json").stdout)["steps"]
    assert all(s["tiers"]["memory"] != "pending" for s in steps), steps
    r0.close()


def test_restart_reports_a_disk_only_step_with_its_size_not_as_staging(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    cfg = "[disk]\nmax_to_keep = 10\n"
    d = daemon_factory(config_text=cfg)
    with CheckpointManager("rs", rank=0, world_size=1, addr=d.addr) as m:
        m.save(1, {"x": np.arange(1000)}).wait(Level.LOCAL_DURABLE, timeout_s=30)
    assert d.terminate() == 0
    # wipe shared memory: step 1 is known from disk only
    for p in d.shm_dir.iterdir():
        p.unlink()
    d = daemon_factory(root=d.root, shm_dir=d.shm_dir, config_text=cfg)
    ls = json.loads(ctl("ls", "rs", "--addr", d.addr, "--json").stdout)["steps"]
    assert ls[0]["step"] == 1 and ls[0]["tiers"]["memory"] == "removed" and ls[0]["nbytes"] == 8000, ls
    st = json.loads(ctl("status", "--addr", d.addr, "--json").stdout)
    assert st["jobs"][0]["in_flight"]["staging"] == 0, st
    assert d.terminate() == 0


def test_a_step_older_than_the_newest_on_disk_is_not_drained_again_after_a_restart(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    """Step 1 is in shared memory but not on disk (an operator removed its disk copy; or the drain
    superseded it) while step 2 is on disk. After a restart that re-adopts the slots, the drain
    must not write step 1 to disk: it is superseded, as it was before the restart."""
    cfg = "[disk]\nmax_to_keep = 10\n"
    d = daemon_factory(config_text=cfg)
    with CheckpointManager("sup", rank=0, world_size=1, addr=d.addr) as m:
        for step in (1, 2):
            m.save(step, {"x": np.full(1000, step)}).wait(Level.LOCAL_DURABLE, timeout_s=30)
    assert ctl("rm", "sup@1", "--tier", "disk", "--yes", "--addr", d.addr).returncode == 0
    assert d.terminate() == 0
    d = daemon_factory(root=d.root, shm_dir=d.shm_dir, config_text=cfg)
    time.sleep(1.5)  # the drain starts with the daemon: give it the time to (wrongly) write step 1
    steps = {s["step"]: s["tiers"] for s in json.loads(ctl("ls", "sup", "--addr", d.addr, "--json").stdout)["steps"]}
    assert steps[1]["memory"] == "committed" and steps[1]["disk"] == "skipped", steps
    assert steps[2]["disk"] == "committed", steps
    assert not (d.root / "data" / "sup" / "step-000000000001").exists()
    assert d.terminate() == 0
