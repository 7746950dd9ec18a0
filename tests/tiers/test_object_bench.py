"""Smoke test of bench/object.py: a small run (the fine-tuning state, two steps, through a link
of tests/linkproxy.py) against its own moto child completes, checks both downloads and the
empty-node daemon restore bit-exact, prints the JSON line and leaves no daemon shm dir behind.
Ratios are machine-dependent: not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench_shm_dirs() -> set[Path]:
    return set(Path("/dev/shm").glob("ckptd-objbench-*"))


def test_object_bench_small_run_prints_json() -> None:
    before = _bench_shm_dirs()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "object.py"), "--size-mib", "6", "--part-size-mib", "5",
         "--reps", "2", "--state", "finetune", "--link-mbit", "2000", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret"},
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(res["bytes"] - 6 * 2**20) < 64 and res["raw_bytes"] == res["bytes"] and res["link_mbit"] == 2000
    assert 0 < res["later_step_upload_fraction"] <= 1 and 0 < res["stored_bytes"] <= res["raw_bytes"]
    for key in ("ckptd_persist_s", "persist_ratio",
                "boto3_upload_s", "ckptd_upload_s", "boto3_download_s", "ckptd_restore_s", "upload_ratio",
                "restore_ratio", "ckptd_daemon_upload_s", "ckptd_daemon_restore_s", "daemon_upload_ratio",
                "daemon_restore_ratio"):
        assert res[key] > 0, key
    assert _bench_shm_dirs() <= before  # both daemons' shm dirs were removed
