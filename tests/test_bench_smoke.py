"""Smoke tests of bench/stall.py, bench/dcp.py and bench/scale.py: a small run completes, prints
its JSON and cleans up.

The stall bench starts a real daemon, so it also exercises the save and drain paths at 32 MiB;
the scale bench starts three daemons that replicate, lose one and restore it. Timing ratios are
machine-dependent and deliberately not asserted here; call counts are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str) -> dict[str, Any]:
    """Run ``bench/<script> args``; assert it exits 0 and return the JSON object of its last line."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def test_stall_bench_small_run_prints_json(tmp_path: Path) -> None:
    res = run_bench("stall.py", "--size-mib", "32", "--reps", "2", "--json", "--skip-peers", "--dir", str(tmp_path))
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
    assert res["ckptd_prepare_s"] > 0 and res["ckptd_prepared_slots"] == 2  # the budget holds two slots
    assert res["ckptd_prepared_first_save_s"] > 0 and res["ckptd_prepared_first_save_over_steady"] > 0
    assert len(res["ckptd_prepared_later_saves_s"]) == 2 and res["ckptd_prepared_first_save_over_its_later"] > 0
    assert res["torch_save_s"] is None and res["dcp_async_blocking_s"] is None and res["dlrover_stall_s"] is None
    assert res["ckptd_slots_after_timed"] == 2  # the two slots were reused, not re-created
    assert res["machine"]["torch_version"]
    # everything the bench created is gone: work dir, the daemon's shm dir and socket dir, the floor file
    assert res["temp_paths"] and not any(Path(p).exists() for p in res["temp_paths"])
    assert list(tmp_path.iterdir()) == []


def test_goodput_bench_tiny_run_reports_every_method(tmp_path: Path) -> None:
    """A tiny bench/goodput.py run: real training steps, a real daemon, DCP; DLRover named through an
    interpreter that does not exist is reported unavailable with its reason, and the run goes on."""
    res = run_bench("goodput.py", "--size-mib", "2", "--width", "64", "--batch", "4", "--steps", "3", "--warmup", "1",
                    "--json", "--dir", str(tmp_path), "--dlrover-python", str(tmp_path / "no-such-python"))
    assert res["steps"] == 3 and res["threads"] == 1 and res["state_bytes"] >= 2 * 2**20
    methods = res["methods"]
    assert set(methods) == {"none", "ckptd_sync", "ckptd_overlap", "dcp_async", "dlrover"}
    for name in ("none", "ckptd_sync", "ckptd_overlap", "dcp_async"):
        m = methods[name]
        assert "error" not in m, m
        assert m["wall_s"] > 0 and len(m["blocked_ms_all"]) == 3
        assert m["blocked_ms_p99"] >= m["blocked_ms_median"] >= 0
        assert isinstance(m["overhead"], float)
    assert methods["none"]["overhead"] == 0.0 and methods["none"]["durable_saves"] == 0
    assert 1 <= methods["ckptd_sync"]["durable_saves"] <= 3 and methods["ckptd_sync"]["daemon_cpu_s"] >= 0
    assert 1 <= methods["ckptd_overlap"]["durable_saves"] <= 3
    assert methods["dcp_async"]["durable_saves"] == 3  # every upload awaited
    assert methods["dlrover"]["available"] is False and "no-such-python" in methods["dlrover"]["error"]
    assert list(tmp_path.iterdir()) == []  # work dirs removed


def test_dcp_bench_small_run_prints_json(tmp_path: Path) -> None:
    """bench/dcp.py at 8 MiB: both backends save, the JSON names every figure, nothing is left."""
    res = run_bench("dcp.py", "--size-mib", "8", "--reps", "1", "--json", "--dir", str(tmp_path))
    assert res["bytes"] == 8 * 2**20
    for key in ("ckptd_blocked_s", "dcp_blocked_s", "ckptd_durable_s", "dcp_durable_s"):
        assert res[key] > 0 and len(res["samples"][key]) == 1, key
    assert list(tmp_path.iterdir()) == []


def test_scale_bench_small_run_prints_measured_and_model_figures() -> None:
    """bench/scale.py with three real daemons (one lost and restored) and a model of 200 nodes:
    the JSON has the measured figures, the model's per node count, and nothing is left behind."""
    res = run_bench("scale.py", "--nodes", "3", "--steps", "2", "--model-nodes", "200", "--iterations", "1", "--json")
    [m] = res["measured"]
    assert m["nodes"] == 3 and m["commit_replicated_s"] > 0 and m["commit_local_durable_s"] > 0
    rpcs = m["rpcs_per_step"]
    # long polls: each of the 2 other nodes reports at each of the two tiers, once unless a step
    # outlasts the 0.5 s long poll on a loaded machine (then again, and it may ping): counted, not 0.2 s polls
    assert 4 <= rpcs["coordinator_received_by_method"]["ReportReady"] < 4 * 10
    assert sum(m["replicas_per_node"].values()) == 3  # k = 1: one replica of each rank's shard
    assert m["report_cost"]["coordinator_cpu_s_per_report"] > 0
    loss = m["loss"]
    assert "unreachable" in loss["reason"] and loss["detect_s"] >= loss["push_timeout_s"]
    assert loss["restore_served_from"] == ["peer"]
    model = res["model"]["200"]
    commit = model["every_1s"]["commit"]
    assert set(commit) == {"poll", "long_poll", "tree"}
    assert commit["long_poll"]["coordinator_rpcs_per_s"] < commit["poll"]["coordinator_rpcs_per_s"]
    store = model["every_1s"]["object_store"]
    assert store["after"]["get_list_per_s_busiest_prefix"] < store["before"]["get_list_per_s_busiest_prefix"]
    assert res["model_check"][0]["measured_reports_per_step"] > 0
    assert not any(Path(p).exists() for p in m["temp_paths"])


def test_gpu_bench_runs_or_says_why_not(tmp_path: Path) -> None:
    """bench/gpu.py --json: without a CUDA device one JSON line saying so and exit 0; with one, a
    tiny run that reports every figure."""
    import torch

    res = run_bench("gpu.py", "--json", "--size-mib", "8", "--reps", "1", "--dir", str(tmp_path))
    if not torch.cuda.is_available():
        assert res == {"skipped": "no CUDA device"}
        return
    for key in ("pinned_floor_s", "pageable_floor_s", "ckptd_sync_stall_s", "ckptd_overlap_return_s",
                "ckptd_overlap_copied_s", "dcp_async_blocking_s", "dcp_async_staging_s", "restore_h2d_s"):
        assert res[key] is not None and res[key] > 0, key
    assert res["pinned_bytes"] > 0
    assert list(tmp_path.iterdir()) == []
