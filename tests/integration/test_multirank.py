"""Several ranks as separate processes save to one daemon; fresh processes restore every rank exactly.

World size 2 (torch state) and 4 (numpy state, so the test stays fast) share one daemon. Each rank
saves steps 1..3, waiting for LOCAL_DURABLE before the next (which needs every rank: a barrier).
Then the manifest on disk must list every rank with its shard, and a new process per rank restores
each step bit-exact (tests/_multirank_worker.py does the per-rank work).
"""

from __future__ import annotations

from typing import Any

import pytest
from ckptd_client import CheckpointManager

from ckptd.core.manifest import Manifest
from ckptd.core.types import shard_key, step_dirname
from tests._ckptd_helpers import PYTHON, REPO, Daemon, run_rank_processes, unique_job

WORKER = REPO / "tests" / "_multirank_worker.py"
STEPS = [1, 2, 3]


def run_ranks(d: Daemon, mode: str, job: str, world_size: int, steps: str, use_torch: bool) -> list[dict[str, Any]]:
    """Run one worker process per rank concurrently; return their JSON reports (rank order)."""
    reports = run_rank_processes([[PYTHON, str(WORKER), mode, "--addr", d.addr, "--job", job, "--rank", str(rank),
                                   "--world-size", str(world_size), "--steps", steps]
                                  + (["--torch"] if use_torch else []) for rank in range(world_size)], timeout_s=240)
    assert d.alive(), d.log()
    return reports


@pytest.mark.parametrize("world_size,use_torch", [(2, True), (4, False)], ids=["ws2-torch", "ws4-numpy"])
def test_ranks_save_then_fresh_processes_restore(mod_daemon: Daemon, world_size: int, use_torch: bool) -> None:
    job = unique_job(f"mr{world_size}")
    saved = run_ranks(mod_daemon, "save", job, world_size, ",".join(map(str, STEPS)), use_torch)
    assert [r["rank"] for r in saved] == list(range(world_size))
    assert all(r["errors"] == [] for r in saved), saved

    # The disk tier holds one committed step directory per step, listing every rank.
    job_dir = mod_daemon.data_dir / job
    assert sorted(p.name for p in job_dir.iterdir()) == [step_dirname(s) for s in STEPS]
    for step in STEPS:
        step_dir = job_dir / step_dirname(step)
        m = Manifest.from_json((step_dir / "manifest.json").read_bytes())
        assert (m.job, m.step, m.world_size) == (job, step, world_size)
        assert [s.rank for s in m.shards] == list(range(world_size))
        assert sorted(p.name for p in step_dir.iterdir()) == sorted(
            ["manifest.json"] + [shard_key(r) for r in range(world_size)])
        for s in m.shards:
            assert s.key == shard_key(s.rank)
            assert (step_dir / s.key).stat().st_size == s.nbytes
            assert s.nbytes == saved[s.rank]["nbytes"][str(step)]
            assert s.tensors and s.tree["d"]
        assert len({s.nbytes for s in m.shards}) == world_size  # really per-rank shards
    with CheckpointManager(job, rank=0, world_size=world_size, addr=mod_daemon.addr) as m0:
        assert m0.all_steps() == STEPS
        assert m0.latest_step() == STEPS[-1]

    restored = run_ranks(mod_daemon, "restore", job, world_size, "latest,1,2,3", use_torch)
    for r in restored:
        assert r["errors"] == [], r
        assert r["latest"] == STEPS[-1]
        assert r["all_steps"] == STEPS
        assert set(r["served_from"]) == {"latest", "1", "2", "3"}
        assert set(r["served_from"].values()) <= {"memory", "disk"}
