"""Smoke test of bench/stall.py: a small run completes, prints its JSON and cleans up.

It starts a real daemon through the bench, so it also exercises the save and drain paths at
32 MiB. Timing ratios are machine-dependent and deliberately not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_stall_bench_small_run_prints_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "stall.py"), "--size-mib", "32", "--reps", "2", "--json",
         "--skip-peers", "--dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    last = proc.stdout.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["bytes"] > 30 * 2**20
    assert res["tensors"] >= 300
    assert res["floor_s"] > 0
    assert res["ckptd_stall_s"] > 0
    assert res["ckptd_drain_s"] > 0
    assert res["fsync_floor_s"] > 0
    assert res["restore_floor_s"] > 0 and res["restore_memory_s"] > 0
    assert res["restore_served_from"] == ["memory"]
    assert isinstance(res["per_tensor_save_us"], float) and isinstance(res["per_tensor_restore_us"], float)
    assert len(res["ckptd_warmup_stalls_s"]) == 3
    assert res["torch_save_s"] is None and res["dcp_async_blocking_s"] is None and res["dlrover_stall_s"] is None
    assert res["ckptd_slots_after_timed"] == 2  # the two slots were reused, not re-created
    assert res["machine"]["torch_version"]
    # everything the bench created is gone: work dir, the daemon's shm dir and socket dir, the floor file
    assert res["temp_paths"] and not any(Path(p).exists() for p in res["temp_paths"])
    assert list(tmp_path.iterdir()) == []
