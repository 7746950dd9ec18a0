"""The restore half of ``bench/stall.py``: restore from the local daemon's memory tier, against a
bare copy of the same bytes.

``restore_series`` runs, after the save repetitions, one untimed restore and then ``reps`` rounds
of: the two restore floors (the shard's bytes copied from a pre-faulted /dev/shm mapping into the
state's tensors: ``FloorCopier.restore_copy``, torch ``copy_`` tensor by tensor, and
``restore_pooled``, 4 MiB pieces over a thread pool) and ``CheckpointManager.restore`` of the newest
step into the same tensors in place (served by the memory tier: the JSON says which tier served
every sample). ``restore_floor_s`` is the faster floor's median (both are in the JSON),
``restore_memory_s`` the restore's; ``restore_memory_over_floor_paired`` is the median of each
round's restore over that round's faster floor (the host's slow drifts cancel). That manager saved
the step, so its restore reads through the mapping its saves hold of the slot; a trainer restarted
after a crash maps the slot anew (in the background from its manager's construction,
restore/premap.py): ``restore_memory_new_manager_s`` is the restore of a manager made just before it
(construction not timed, its background mapping included whatever part of it the restore waits for).
"""

from __future__ import annotations

import time
from typing import Any

from _stall_floor import FloorCopier
from _util import median


def restore_series(res: dict[str, Any], s: dict[str, list[float]], mgr: Any, state: Any, copier: FloorCopier,
                   reps: int) -> None:
    mgr.restore(state)  # warm-up: the restore path's imports and first mapping
    from ckptd_client import CheckpointManager

    s["restore_floor_torch"], s["restore_floor_pooled"], s["restore_memory"], s["restore_daemon_read"] = [], [], [], []
    s["restore_memory_new_manager"] = []
    served: list[str] = []
    for _ in range(reps):
        s["restore_floor_torch"].append(copier.restore_copy())
        s["restore_floor_pooled"].append(copier.restore_pooled())
        t0 = time.perf_counter()
        mgr.restore(state)
        s["restore_memory"].append(time.perf_counter() - t0)
        info = mgr.last_restore
        served.append(info.served_from if info is not None else "")
        s["restore_daemon_read"].append(info.daemon_read_s if info is not None else 0.0)
        fresh = CheckpointManager(mgr.job, rank=mgr.rank, world_size=mgr.world_size, addr=mgr.addr, on_error="raise")
        try:
            t0 = time.perf_counter()
            fresh.restore(state)
            s["restore_memory_new_manager"].append(time.perf_counter() - t0)
            info = fresh.last_restore
            served.append(info.served_from if info is not None else "")
        finally:
            fresh.close()
    res["restore_floor_torch_s"] = median(s["restore_floor_torch"])
    res["restore_floor_pooled_s"] = median(s["restore_floor_pooled"])
    s["restore_floor"] = min((s["restore_floor_torch"], s["restore_floor_pooled"]), key=lambda xs: median(xs) or 0.0)
    res["restore_floor_s"] = median(s["restore_floor"])
    res["restore_memory_s"] = median(s["restore_memory"])
    rounds = zip(s["restore_memory"], s["restore_floor_torch"], s["restore_floor_pooled"])
    paired = [r / min(a, b) for r, a, b in rounds]
    res["restore_memory_over_floor_paired"] = round(median(paired), 4) if paired else None
    res["restore_memory_daemon_read_s"] = median(s["restore_daemon_read"])
    res["restore_memory_new_manager_s"] = median(s["restore_memory_new_manager"])
    res["restore_served_from"] = sorted(set(served))
    for k in ("restore_floor_torch", "restore_floor_pooled", "restore_memory", "restore_memory_new_manager"):
        res[f"{k}_all_s"] = [round(x, 6) for x in s[k]]
