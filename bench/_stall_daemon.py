"""ckptd as ``bench/stall.py`` runs it: a ``ckptd serve`` subprocess, and the fixed costs of a save.

``serve_with_manager`` starts one and opens a ``CheckpointManager`` on it, both registered with a
``Cleanup`` (the main series and the prepared one of ``bench/stall.py`` use it). ``Daemon`` starts
the daemon in its own session, waits until it serves, parses its own disk-commit
time per step from its "LOCAL_DURABLE" log lines, and stops it (SIGTERM, then SIGKILL of its
group). ``stall_diagnostics`` times the client's flatten of the state and one RPC round trip.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _util import MIB, Cleanup, ServeProcess, median

SLOT_ALIGN = 2 * MIB  # ckptd.memory.slots.SLOT_ALIGN_BYTES
_DURABLE_RE = re.compile(r"step (?P<job>\S+)@(?P<step>\d+) LOCAL_DURABLE \((?P<bytes>\d+) bytes in (?P<s>[0-9.]+)s\)")


class Daemon(ServeProcess):
    """``ckptd serve`` as a subprocess in its own session."""

    def __init__(self, root: Path, shm_dir: Path, socket: Path, budget: int, log_path: Path) -> None:
        super().__init__("stall", socket, log_path, ["--root", str(root), "--shm-dir", str(shm_dir),
                                                     "--budget-bytes", str(budget), "--log-level", "INFO"])
        self.root, self.shm_dir = root, shm_dir

    def drain_seconds(self) -> dict[int, float]:
        """Per step, the daemon's own disk-commit time from its LOCAL_DURABLE log line."""
        out: dict[int, float] = {}
        for msg, _ in self.log_messages():
            m = _DURABLE_RE.search(msg)
            if m:
                out[int(m["step"])] = float(m["s"])
        return out


def serve_with_manager(cleanup: Cleanup, name: str, root: Path, shm_dir: Path, socket: Path, budget: int,
                       log_path: Path, job: str) -> tuple[Daemon, Any]:
    """A started ``Daemon`` (its shm dir removed by ``cleanup``, after the daemon stops) and a
    ``CheckpointManager`` of ``job`` on it (closed first), each registered as ``name``."""
    from ckptd_client import CheckpointManager

    cleanup.add(f"{name} shm dir", lambda: shutil.rmtree(shm_dir, ignore_errors=True))
    daemon = Daemon(root, shm_dir, socket, budget, log_path)
    cleanup.add(f"{name} daemon", daemon.stop)
    daemon.start()
    mgr = CheckpointManager(job, rank=0, world_size=1, addr=str(daemon.socket), on_error="raise")
    cleanup.add(f"{name} client", mgr.close)
    return daemon, mgr


def stall_diagnostics(mgr: Any, state: Any, rpc: Callable[[], int]) -> dict[str, float | None]:
    """Fixed costs inside a ckptd save: the client's flatten of the state, one RPC round trip."""
    from ckptd_client.tree import flatten

    flat: list[float] = []
    rtt: list[float] = []
    for _ in range(5):
        t0 = time.perf_counter()
        flatten(state)
        flat.append(time.perf_counter() - t0)
    for _ in range(20):
        t0 = time.perf_counter()
        rpc()
        rtt.append(time.perf_counter() - t0)
    return {"ckptd_flatten_s": median(flat), "ckptd_rpc_rtt_s": median(rtt)}
