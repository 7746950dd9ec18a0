"""A corrupt or truncated newest step does not stop an auto-resuming job.

When no valid copy of the newest step is left for a rank (memory copy gone, disk copy with a
flipped byte or a truncated manifest), ``restore("latest")`` resumes from the newest older step
that restores, logs it, counts it (``ckptd_restore_fallbacks_total``) and reports the skipped
steps in ``last_restore.unusable_steps``; ``strict_latest=True`` keeps the IntegrityError. With a
torch.distributed process group every rank moves to the same older step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from ckptd_client import CheckpointManager, IntegrityError, Level

from tests.conftest import DaemonProc

CTL = [sys.executable, "-m", "ckptd.ctl.main"]


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    return subprocess.run([*CTL, *args], capture_output=True, text=True, env=env, timeout=120)


def step_dir(d: DaemonProc, job: str, step: int) -> Path:
    return d.root / "data" / job / f"step-{step:012d}"


def flip(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def saved_two_steps(d: DaemonProc, job: str, rank: int = 0, world_size: int = 1,
                    node_ranks: list[int] | None = None) -> None:
    with CheckpointManager(job, rank=rank, world_size=world_size, addr=d.addr, node_ranks=node_ranks) as m:
        for step in (1, 2):
            m.save(step, {"x": np.full(1000, step * 10 + rank, dtype=np.int64)})
        m._wait(2, Level.LOCAL_DURABLE, 30)
    # the memory copy of step 2 goes: its disk copy is the only one left
    res = ctl("rm", f"{job}@2", "--tier", "memory", "--yes", "--addr", d.addr)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("damage", ["flipped byte", "truncated manifest"])
def test_latest_falls_back_to_the_newest_step_that_restores(daemon_factory: Callable[..., DaemonProc],
                                                            damage: str) -> None:
    d = daemon_factory(config_text="[disk]\nmax_to_keep = 10\n")
    saved_two_steps(d, "fb")
    if damage == "flipped byte":
        flip(step_dir(d, "fb", 2) / "rank-000000.shard")
    else:
        os.truncate(step_dir(d, "fb", 2) / "manifest.json", 40)
    with CheckpointManager("fb", rank=0, world_size=1, addr=d.addr) as m:
        with pytest.raises(IntegrityError):
            m.restore({"x": np.zeros(1000, dtype=np.int64)}, strict_latest=True)
        state = {"x": np.zeros(1000, dtype=np.int64)}
        assert m.restore(state) == 1
        assert (state["x"] == 10).all()
        assert m.last_restore is not None and m.last_restore.unusable_steps == [2]
        with pytest.raises(IntegrityError):  # an explicit step never falls back
            m.restore({"x": np.zeros(1000, dtype=np.int64)}, step=2)
    assert "step 2 has no valid copy" in d.log() and "falling back" in d.log()


def test_no_older_step_left_is_a_clear_error(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(config_text="[disk]\nmax_to_keep = 10\n")
    saved_two_steps(d, "none")
    res = ctl("rm", "none@1", "--yes", "--addr", d.addr)
    assert res.returncode == 0, res.stderr
    flip(step_dir(d, "none", 2) / "rank-000000.shard")
    with CheckpointManager("none", rank=0, world_size=1, addr=d.addr) as m:
        with pytest.raises(IntegrityError, match="no older committed step"):
            m.restore({"x": np.zeros(1000, dtype=np.int64)})


WORKER = r'''
import json, sys
import numpy as np
import torch.distributed as dist
from ckptd_client import CheckpointManager, IntegrityError
rank, addr, init, strict = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "strict"
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
with CheckpointManager("agree", addr=addr, node_ranks=[rank]) as m:
    state = {"x": np.zeros(1000, dtype=np.int64)}
    try:
        step = m.restore(state, strict_latest=strict)
        out = {"rank": rank, "step": step, "x0": int(state["x"][0]), "unusable": m.last_restore.unusable_steps}
    except IntegrityError as exc:
        out = {"rank": rank, "error": type(exc).__name__}
    print(json.dumps(out))
dist.destroy_process_group()
'''


def test_every_rank_falls_back_to_the_same_step(daemon_factory: Callable[..., DaemonProc], tmp_path: Path) -> None:
    """Rank 1's copy of step 2 is corrupt and its node holds no other; rank 0's is fine. Both ranks
    resume from step 1 (never rank 0 from 2 and rank 1 from 1); strictly, both fail."""
    nodes = [daemon_factory(config_text="[disk]\nmax_to_keep = 10\n") for _ in range(2)]
    for r in range(2):
        saved_two_steps(nodes[r], "agree", rank=r, world_size=2, node_ranks=[r])
    flip(step_dir(nodes[1], "agree", 2) / "rank-000001.shard")
    for mode in ("strict", "fallback"):
        init = f"file://{tmp_path / f'pg-{mode}'}"
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), nodes[r].addr, init, mode],
                                  stdout=subprocess.PIPE, text=True) for r in range(2)]
        outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        if mode == "strict":
            assert [o.get("error") for o in outs] == ["IntegrityError", "IntegrityError"], outs
        else:
            assert [(o["rank"], o["step"], o["x0"], o["unusable"]) for o in outs] == \
                [(0, 1, 10, [2]), (1, 1, 11, [2])], outs
