"""Smoke tests of bench/stall.py and bench/dcp.py: a small run completes, prints its JSON and cleans up.

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


def test_goodput_bench_tiny_run_reports_every_method(tmp_path: Path) -> None:
    """A tiny bench/goodput.py run: real training steps, a real daemon, DCP; DLRover named through an
    interpreter that does not exist is reported unavailable with its reason, and the run goes on."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "goodput.py"), "--size-mib", "2", "--width", "64", "--batch", "4",
         "--steps", "3", "--warmup", "1", "--json", "--dir", str(tmp_path),
         "--dlrover-python", str(tmp_path / "no-such-python")],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["steps"] == 3 and res["threads"] == 1 and res["state_bytes"] >= 2 * 2**20
    methods = res["methods"]
    assert set(methods) == {"none", "ckptd_sync", "dcp_async", "dlrover"}
    for name in ("none", "ckptd_sync", "dcp_async"):
        m = methods[name]
        assert "error" not in m, m
        assert m["wall_s"] > 0 and len(m["blocked_ms_all"]) == 3
        assert m["blocked_ms_p99"] >= m["blocked_ms_median"] >= 0
        assert isinstance(m["overhead"], float)
    assert methods["none"]["overhead"] == 0.0 and methods["none"]["durable_saves"] == 0
    assert 1 <= methods["ckptd_sync"]["durable_saves"] <= 3 and methods["ckptd_sync"]["daemon_cpu_s"] >= 0
    assert methods["dcp_async"]["durable_saves"] == 3  # every upload awaited
    assert methods["dlrover"]["available"] is False and "no-such-python" in methods["dlrover"]["error"]
    assert list(tmp_path.iterdir()) == []  # work dirs removed


def test_dcp_bench_small_run_prints_json(tmp_path: Path) -> None:
    """bench/dcp.py at 8 MiB: both backends save, the JSON names every figure, nothing is left."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dcp.py"), "--size-mib", "8", "--reps", "1", "--json",
         "--dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["bytes"] == 8 * 2**20
    for key in ("ckptd_blocked_s", "dcp_blocked_s", "ckptd_durable_s", "dcp_durable_s"):
        assert res[key] > 0 and len(res["samples"][key]) == 1, key
    assert list(tmp_path.iterdir()) == []
