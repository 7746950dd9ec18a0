"""bench/stall.py's prepared first save: the first save of a job whose slots were prepared ahead.

``prepared_first_save`` starts a second ``ckptd serve`` (its own shm directory, the same budget
as the main one, so nothing it does shares a slot or a mapping with the main series), opens a
manager for a new job, calls ``prepare_save(state)`` and waits for it (``ckptd_prepare_s``: the
daemon making and faulting in the rank's slots, then the client mapping and populating them,
off the training loop in real use), then takes the job's first save (``ckptd_prepared_first_
save_s``) and ``reps`` more (``ckptd_prepared_later_saves_s``), each drained to LOCAL_DURABLE.
The ratio against the main series' steady stall is ``ckptd_prepared_first_save_over_steady``;
against this daemon's later saves, taken in the same minute (on a shared host the main series
ran minutes earlier), ``ckptd_prepared_first_save_over_its_later``. The unprepared figure stays
``ckptd_first_save_over_steady`` (the main series' first warm-up save).
The daemon, its files and the manager are removed before it returns, also after an error.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from _stall_daemon import serve_with_manager
from _util import Cleanup, median


def prepared_first_save(res: dict[str, Any], state: Any, workdir: Path, sock_dir: Path, tag: str, budget: int,
                        durable_timeout_s: float, reps: int, shm_base: Path = Path("/dev/shm")) -> None:
    from ckptd_client import Level

    shm_dir = shm_base / f"ckptd-bench-prep-{tag}"
    res["temp_paths"].append(str(shm_dir))  # removed on return, like the others
    cleanup = Cleanup()
    try:
        _, mgr = serve_with_manager(cleanup, "prepared", workdir / "ckptd-root-prep", shm_dir, sock_dir / "prep.sock",
                                    budget, workdir / "prep.log", "bench-prepared")
        t0 = time.perf_counter()
        prep = mgr.prepare_save(state)
        prep.wait()
        res["ckptd_prepare_s"] = round(time.perf_counter() - t0, 6)
        res["ckptd_prepared_slots"] = prep.slots_mapped
        stalls = []
        for step in range(1, reps + 2):
            h = mgr.save(step, state)
            stalls.append(h.stall_s)
            h.wait(Level.LOCAL_DURABLE, timeout_s=durable_timeout_s)
        res["ckptd_prepared_first_save_s"] = round(stalls[0], 6)
        res["ckptd_prepared_later_saves_s"] = [round(x, 6) for x in stalls[1:]]
        res["ckptd_prepared_first_save_over_steady"] = round(stalls[0] / res["ckptd_stall_s"], 4)
        # the same daemon's later saves, minutes closer in time than the main series on a shared host
        res["ckptd_prepared_first_save_over_its_later"] = round(stalls[0] / median(stalls[1:]), 4)
    finally:
        cleanup.run()
