"""The Prometheus endpoint, scraped over HTTP after a real save, shows its bytes and stall."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests._ckptd_helpers import free_port
from tests.conftest import DaemonProc


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_after_save(daemon_factory: Callable[..., DaemonProc]) -> None:
    port = free_port()
    d = daemon_factory(env={"CKPTD_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    state = {"w": np.arange(250_000, dtype=np.float32)}
    with CheckpointManager("metrics-job", rank=0, world_size=1, addr=d.addr) as m:
        h = m.save(1, state)
        assert h.ok
        h.wait(Level.LOCAL_DURABLE, timeout_s=30)
    deadline = time.monotonic() + 10
    while True:
        got = _scrape(port)
        if got.get('ckptd_tier_written_bytes_total{tier="disk"}', 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    nbytes = state["w"].nbytes
    assert got['ckptd_tier_written_bytes_total{tier="memory"}'] == nbytes
    assert got['ckptd_tier_written_bytes_total{tier="disk"}'] == nbytes
    assert got["ckptd_save_blocking_seconds_count"] == 1
    assert got["ckptd_save_blocking_seconds_sum"] > 0
    assert got['ckptd_last_committed_step{job="metrics-job",tier="disk"}'] == 1
    assert got["ckptd_shm_bytes_in_use"] > 0
    assert 'ckptd_build_info{version="0.1.0"}' in got


def test_bad_metrics_address_is_a_config_error(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(env={"CKPTD_METRICS_ADDRESS": "nonsense"}, wait=False)
    assert d.proc.wait(20) == 2
    assert "metrics.address" in d.log()
