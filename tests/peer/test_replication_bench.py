"""Smoke test of bench/replication.py: a small run completes, checks bit-exactness itself, prints
its JSON with the contract's keys (component paths and real daemons), and leaves no child process
or shm dir behind. Ratios are not asserted
(machine-dependent); the 512 MiB figures go in the closing note."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peer._kit import REPO

pytestmark = pytest.mark.timeout(120)


def test_replication_bench_small_run_prints_json() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "replication.py"), "--size-mib", "16",
                           "--reps", "1", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=100,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["bytes"] == 16 * 2**20
    for key in ("tcp_s", "component_push_s", "component_fetch_s", "component_push_grpc_s",
                "component_fetch_grpc_s"):
        assert res[key] > 0, key
    # through real daemons: the bench itself checked bytes and serving tier; the JSON records them
    for key in ("ckptd_replicate_s", "restore_memory_s", "restore_disk_s", "restore_peer_s",
                "restore_peer_unprepared_s"):
        assert res[key] > 0, key
        assert res[f"{key[:-2]}_vs_tcp"] > 0, key
    assert set(res["daemon_served_from"]["restore_memory_s"]) == {"memory"}
    assert res["daemon_served_from"]["restore_disk_s"] == ["disk"]
    assert res["daemon_served_from"]["restore_peer_s"] == ["peer"]
    assert res["daemon_restore_slots_prepared"] == [1]  # the fresh node prepared rank 0's slot
    assert res["client_restore_slot_premapped"] == [True]  # and the trainer mapped it ahead
    assert res["client_memory_slot_premapped"] == [True]  # as a restarted trainer maps the memory copy
    assert len(res["daemon_shm_dirs"]) == 2
    assert not [d for d in res["daemon_shm_dirs"] if Path(d).exists()], "the bench left shm dirs behind"
    # CPU seconds per timed region: every process named, non-negative, the total their sum
    names = {"tcp": {"sender", "receiver"}, "ckptd_replicate": {"sending_daemon", "receiving_daemon", "trainer"},
             "restore_peer": {"restoring_daemon", "serving_daemon", "trainer"}}
    for region, procs in names.items():
        cpu = res["cpu_s"][region]
        assert set(cpu) == procs | {"total"}, region
        assert all(v >= 0 for v in cpu.values()) and cpu["total"] == pytest.approx(sum(cpu[p] for p in procs))
        assert res["cpu_floor_s"][region] == pytest.approx(cpu["total"] / res["machine"]["cpus"])
    assert res["cpu_s"]["restore_peer"]["trainer"] > 0  # this process copied 16 MiB: never 0
    # the floor of a restore from RAM, sampled beside it, with its two ratios
    for key in ("memcpy_s", "memcpy_fresh_map_s"):
        assert res[key] > 0 and len(res["samples"][key]) == 1, key
    assert res["restore_memory_vs_memcpy"] == pytest.approx(res["restore_memory_s"] / res["memcpy_s"])
    assert not list(Path("/dev/shm").glob("ckbench-memcpy-*")), "the memcpy floor's file was left behind"
