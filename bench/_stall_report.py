"""What ``bench/stall.py`` reports: its log on stderr, the machine context, the summary, the table.

``summarize_*`` turn the per-repetition samples into the medians, minima and ratios of the result
JSON (keys in the order the bench has always printed them); ``table`` renders that JSON as the
human-readable table printed before it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _util import GIB, MIB, gib_per_s, median

if TYPE_CHECKING:
    from _stall_daemon import Daemon


def log(msg: str) -> None:
    print(f"[stall] {msg}", file=sys.stderr, flush=True)


def machine_context(workdir: Path) -> dict[str, Any]:
    import torch

    ctx: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_start": list(os.getloadavg()),
        "dir": str(workdir),
    }
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ctx["mem_total_gib"] = round(int(line.split()[1]) * 1024 / GIB, 1)
    with contextlib.suppress(OSError):
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(workdir).startswith(parts[1]) and len(parts[1]) >= len(best):
                best = parts[1]
                ctx["dir_fs"] = f"{parts[2]} on {parts[1]} ({parts[0]})"
    return ctx



def summarize_core(res: dict[str, Any], s: dict[str, list[float]], diag: dict[str, float | None], daemon: Daemon,
                   timed_steps: list[int], direct_error: str | None) -> None:
    for k, xs in s.items():
        res[f"{k}_all_s"] = [round(x, 6) for x in xs]
    floor_torch, floor_mm = median(s["floor_torch_copy"]), median(s["floor_memmove"])
    res["floor_torch_copy_s"], res["floor_memmove_s"] = floor_torch, floor_mm
    res["floor_s"] = min(x for x in (floor_torch, floor_mm) if x is not None)
    res["floor_method"] = "torch copy_" if res["floor_s"] == floor_torch else "ctypes.memmove"
    res["floor_min_s"] = min(s["floor_torch_copy"] + s["floor_memmove"])
    res["ckptd_stall_s"] = median(s["ckptd_stall"])
    res["ckptd_stall_min_s"] = min(s["ckptd_stall"])
    res["ckptd_stall_client_s"] = median(s["ckptd_stall_client"])
    res["ckptd_begin_save_s"] = median(s["ckptd_begin_save"])
    res.update(diag)
    res["fsync_buffered_s"] = median(s["fsync_buffered"])
    res["fsync_direct_s"] = median(s["fsync_direct"])
    if direct_error:
        res["fsync_direct_error"] = direct_error
    res["fsync_floor_s"] = min(x for x in (res["fsync_buffered_s"], res["fsync_direct_s"]) if x is not None)
    res["ckptd_drain_s"] = median(s["ckptd_drain"])
    per_step = daemon.drain_seconds()
    daemon_drain = [per_step[st] for st in timed_steps if st in per_step]
    res["ckptd_drain_daemon_s"] = median(daemon_drain)
    res["ckptd_drain_daemon_all_s"] = daemon_drain


def summarize_dlrover(res: dict[str, Any], samples: list[float], paired: list[float], info: dict[str, Any],
                      wanted: bool) -> None:
    res["dlrover_stall_s"] = median(samples)
    if res["dlrover_stall_s"] is None and wanted:
        res["dlrover_error"] = info.get("error") or f"every DLRover save was skipped ({info.get('skipped')})"
    elif wanted:
        res["dlrover_stall_min_s"] = min(samples)
        res["dlrover_skipped"] = info.get("skipped", 0)
        res["dlrover_version"] = info.get("version")
        res["dlrover_init_s"] = info.get("init_s")
        res["ckptd_stall_over_dlrover_paired"] = median(paired)


def summarize_dcp(res: dict[str, Any], dcp_res: dict[str, Any]) -> None:
    if "error" in dcp_res:
        res["dcp_error"] = dcp_res["error"]
        return
    best: tuple[float, str] | None = None
    for name, v in dcp_res["variants"].items():
        m_call, m_mut = median(v["call_s"]), median(v["until_mutable_s"])
        v["call_median_s"], v["until_mutable_median_s"] = m_call, m_mut
        v["total_median_s"] = median(v["total_s"])
        if m_mut is not None and (best is None or m_mut < best[0]):
            best = (m_mut, name)
    res["dcp"] = dcp_res["variants"]
    if best is not None:
        res["dcp_async_blocking_s"], res["dcp_config"] = best
    a = dcp_res["variants"].get("async_staging")
    res["dcp_async_call_return_s"] = a["call_median_s"] if a else None


def summarize_ratios(res: dict[str, Any]) -> None:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    res["ckptd_stall_over_floor"] = ratio(res["ckptd_stall_s"], res["floor_s"])
    res["ckptd_drain_over_fsync_floor"] = ratio(res["ckptd_drain_s"], res["fsync_floor_s"])
    res["ckptd_drain_daemon_over_fsync_floor"] = ratio(res["ckptd_drain_daemon_s"], res["fsync_floor_s"])
    res["ckptd_stall_over_dlrover"] = ratio(res["ckptd_stall_s"], res["dlrover_stall_s"])
    res["ckptd_stall_over_dcp"] = ratio(res["ckptd_stall_s"], res["dcp_async_blocking_s"])
    res["ckptd_stall_over_torch_save"] = ratio(res["ckptd_stall_s"], res["torch_save_s"])


def summarize_per_tensor(res: dict[str, Any]) -> None:
    """Restore against its floor, the first saves against a steady one, and the cost per tensor
    beyond the floor: (ckptd - floor) / tensors, in microseconds."""
    n = res["tensors"] or 1
    floor, rfloor = res["floor_s"], res.get("restore_floor_s")
    res["restore_memory_over_floor"] = (round(res["restore_memory_s"] / rfloor, 4)
                                        if rfloor and res.get("restore_memory_s") is not None else None)
    res["restore_memory_new_manager_over_floor"] = (
        round(res["restore_memory_new_manager_s"] / rfloor, 4)
        if rfloor and res.get("restore_memory_new_manager_s") is not None else None)
    res["per_tensor_save_us"] = round((res["ckptd_stall_s"] - floor) / n * 1e6, 3)
    res["per_tensor_restore_us"] = (round((res["restore_memory_s"] - rfloor) / n * 1e6, 3)
                                    if rfloor is not None and res.get("restore_memory_s") is not None else None)
    warm = res.get("ckptd_warmup_stalls_s") or []
    res["ckptd_first_save_over_steady"] = round(warm[0] / res["ckptd_stall_s"], 4) if warm else None


def table(res: dict[str, Any]) -> str:
    n = res["bytes"]
    floor, disk = res["floor_s"], res["fsync_floor_s"]
    # (tier, method, seconds, reference, why-not key)
    rows: list[tuple[str, str, float | None, float | None, str]] = [
        ("save stall", "memcpy floor (pre-faulted /dev/shm)", floor, floor, ""),
        ("save stall", "  torch copy_", res["floor_torch_copy_s"], floor, ""),
        ("save stall", "  ctypes.memmove", res["floor_memmove_s"], floor, ""),
        ("save stall", "ckptd save", res["ckptd_stall_s"], floor, ""),
        ("save stall", "torch.save + fsync", res["torch_save_s"], floor, "torch_save"),
        ("save stall", "DCP async_save (until state mutable)", res["dcp_async_blocking_s"], floor, "dcp"),
        ("save stall", "  DCP async_save call return (async staging)", res.get("dcp_async_call_return_s"), floor,
         "dcp"),
        ("save stall", "DLRover flash ckpt (MEMORY)", res["dlrover_stall_s"], floor, "dlrover"),
        ("restore", "copy floor (shm mapping -> tensors)", res.get("restore_floor_s"), res.get("restore_floor_s"), ""),
        ("restore", "ckptd restore from memory", res.get("restore_memory_s"), res.get("restore_floor_s"), ""),
        ("restore", "ckptd restore from memory, new manager", res.get("restore_memory_new_manager_s"),
         res.get("restore_floor_s"), ""),
        ("disk drain", "fsync floor", disk, disk, ""),
        ("disk drain", "  buffered write + fsync", res["fsync_buffered_s"], disk, ""),
        ("disk drain", "  O_DIRECT write + fsync", res["fsync_direct_s"], disk, "fsync_direct"),
        ("disk drain", "ckptd STAGED -> LOCAL_DURABLE", res["ckptd_drain_s"], disk, ""),
        ("disk drain", "  ckptd disk commit (daemon log)", res["ckptd_drain_daemon_s"], disk, ""),
    ]
    m = res["machine"]
    out = [f"ckptd bench/stall: {n / MIB:.1f} MiB in {res['tensors']} tensors, median of {res['reps']} reps; "
           f"{m['cpu_count']} CPUs, load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}, "
           f"torch {m['torch_version']}",
           f"{'tier':<11} {'method':<46} {'seconds':>9} {'GiB/s':>7} {'x floor':>8}"]
    for tier, name, sec, ref, key in rows:
        if sec is None:
            err = res.get(f"{key}_error") if key else None
            why = "  (failed: see " + f"{key}_error)" if err else ("  (skipped)" if key else "")
            out.append(f"{tier:<11} {name:<46} {'-':>9} {'-':>7} {'-':>8}{why}")
            continue
        x = f"{sec / ref:>7.2f}x" if ref else f"{'-':>8}"
        out.append(f"{tier:<11} {name:<46} {sec:>9.4f} {gib_per_s(n, sec) or 0:>7.2f} {x}")
    out.append("(x floor: save rows against the memcpy floor, restore rows against the restore copy floor, "
               "disk rows against the fsync floor)")
    out.append(f"restore from memory / floor = {res.get('restore_memory_over_floor')} (paired per round: "
               f"{_r(res.get('restore_memory_over_floor_paired'))})")
    out.append(f"per tensor beyond the floor: save {res.get('per_tensor_save_us')} us, restore "
               f"{res.get('per_tensor_restore_us')} us; first save / steady = "
               f"{res.get('ckptd_first_save_over_steady')}, prepared ahead = "
               f"{res.get('ckptd_prepared_first_save_over_steady')} (over its own later saves "
               f"{res.get('ckptd_prepared_first_save_over_its_later')}; prepare waited {res.get('ckptd_prepare_s')} s)")
    out.append(f"ckptd_stall/floor = {res['ckptd_stall_over_floor']} (paired per rep: "
               f"{_r(res.get('ckptd_stall_over_floor_paired'))}); ckptd_stall/dlrover = "
               f"{res['ckptd_stall_over_dlrover']} (paired: {_r(res.get('ckptd_stall_over_dlrover_paired'))}); "
               f"ckptd_drain/fsync_floor = {res['ckptd_drain_over_fsync_floor']}")
    return "\n".join(out)


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
