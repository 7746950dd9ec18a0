"""The GPU device check: what a save of a CUDA-resident state costs, against the link's floor.

On one CUDA device, for a GPT-like state of ``--size-mib`` (``_util.gpt_state``, moved to the
device), median of ``--reps`` after one warm-up each:

- ``pinned_floor_s``: a bare ``copy_`` of the same bytes (one flat tensor) into a page-locked host
  buffer (``pin_memory=True``), synchronized: the device-to-host floor.
- ``pageable_floor_s``: the same into ordinary (pageable) host memory.
- ``ckptd_sync_stall_s``: ``CheckpointManager.save(step, state)`` into a ``ckptd serve`` daemon
  (its slots page-locked by the client, client/ckptd_client/save/pinned.py), and ``pinned_bytes``,
  ``pin_register_s`` (registration, once per slot).
- ``ckptd_overlap_return_s`` / ``ckptd_overlap_copied_s``: ``save(step, state, overlap=True)``:
  the time until it returns, and until ``handle.wait_copied()`` returns.
- ``dcp_async_staging_s`` / ``dcp_async_blocking_s``: ``torch.distributed.checkpoint.async_save``
  with a persistent ``DefaultStager`` (pinned memory, async staging, non-blocking copies): the
  time until the call returns, and until its staging is done.
- ``restore_h2d_s``: ``CheckpointManager.restore`` of the newest step into the CUDA state.

With ``--json`` the last line is one JSON object of all of it. On a host without CUDA it prints
``{"skipped": "no CUDA device"}`` and exits 0, so the same command can be handed to a GPU
machine as it is. Meant to finish in well under 5 minutes at the default 1024 MiB.

    .venv/bin/python bench/gpu.py --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _stall_daemon import SLOT_ALIGN, Daemon
from _util import MIB, Cleanup, cleaned_up, gpt_state, median


def _timed(fn: Any, reps: int, sync: Any) -> float | None:
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return median(out)


def floors(torch: Any, nbytes: int, reps: int) -> dict[str, Any]:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    sync = torch.cuda.synchronize
    return {"pinned_floor_s": _timed(lambda: pinned.copy_(src), reps, sync),
            "pageable_floor_s": _timed(lambda: pageable.copy_(src), reps, sync)}


def ckptd(torch: Any, state: Any, reps: int, socket: Path) -> dict[str, Any]:
    from ckptd_client import CheckpointManager, Level

    out: dict[str, Any] = {}
    with CheckpointManager("gpu-bench", rank=0, world_size=1, addr=str(socket), on_error="raise") as mgr:
        step = 0
        stalls, returns, copied = [], [], []
        for i in range(reps + 1):
            step += 1
            mgr.save(step, state).wait(Level.STAGED, timeout_s=300)
            if i:
                stalls.append(mgr.stalls_s[-1])
        for i in range(reps + 1):
            step += 1
            t0 = time.perf_counter()
            h = mgr.save(step, state, overlap=True)
            t_ret = time.perf_counter() - t0
            h.wait_copied()
            t_copied = time.perf_counter() - t0
            h.wait(Level.STAGED, timeout_s=300)
            if i:
                returns.append(t_ret)
                copied.append(t_copied)
        pinned = mgr._saver.pinned
        out.update(ckptd_sync_stall_s=median(stalls), ckptd_overlap_return_s=median(returns),
                   ckptd_overlap_copied_s=median(copied), pinned_bytes=pinned.pinned_bytes,
                   pin_register_s=round(pinned.register_s, 4), pin_refused=dict(pinned.refused),
                   pin_usable=pinned.usable()[1] or "yes")
        restores = []
        for _ in range(reps):
            t0 = time.perf_counter()
            mgr.restore(state)
            torch.cuda.synchronize()
            restores.append(time.perf_counter() - t0)
        out["restore_h2d_s"] = median(restores)
    return out


def dcp(torch: Any, state: Any, reps: int, workdir: Path) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import async_save

    dist.init_process_group("gloo", init_method=f"file://{workdir / 'pg-init'}", rank=0, world_size=1)
    stager = DefaultStager(StagingOptions(True, True, True, True))
    returns, staged = [], []
    try:
        for i in range(reps + 1):
            t0 = time.perf_counter()
            resp: Any = async_save(state, checkpoint_id=str(workdir / f"dcp-{i}"), async_stager=stager)
            t_ret = time.perf_counter() - t0
            staging = getattr(resp, "staging_completion", None)
            if staging is not None:
                staging.result()
            t_staged = time.perf_counter() - t0
            getattr(resp, "upload_completion", resp).result()
            shutil.rmtree(workdir / f"dcp-{i}", ignore_errors=True)
            if i:
                returns.append(t_ret)
                staged.append(t_staged)
    finally:
        stager.close()
        dist.destroy_process_group()
    return {"dcp_async_blocking_s": median(returns), "dcp_async_staging_s": median(staged)}


def run(args: argparse.Namespace, cleanup: Cleanup) -> dict[str, Any]:
    import torch

    nbytes = args.size_mib * MIB
    cpu_state, info = gpt_state(nbytes)
    state = torch.utils._pytree.tree_map(lambda v: v.cuda() if isinstance(v, torch.Tensor) else v, cpu_state)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "state_bytes": info.nbytes,
                           "size_mib": args.size_mib, "reps": args.reps, "torch_version": torch.__version__}
    res.update(floors(torch, info.nbytes, args.reps))
    workdir = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=args.dir))
    cleanup.add("work dir", lambda: shutil.rmtree(workdir, ignore_errors=True))
    shm_dir = Path("/dev/shm") / f"ckptd-gpu-{uuid.uuid4().hex[:10]}"
    cleanup.add("ckptd shm dir", lambda: shutil.rmtree(shm_dir, ignore_errors=True))
    slot = (info.nbytes + 16 * MIB) // SLOT_ALIGN * SLOT_ALIGN + SLOT_ALIGN
    daemon = Daemon(workdir / "root", shm_dir, workdir / "ckptd.sock", 3 * slot, workdir / "ckptd.log")
    cleanup.add("ckptd daemon", daemon.stop)
    daemon.start()
    res.update(ckptd(torch, state, args.reps, daemon.socket))
    daemon.stop()
    res.update(dcp(torch, state, args.reps, workdir))
    floor = res["pinned_floor_s"]
    res["ckptd_sync_over_pinned_floor"] = round(res["ckptd_sync_stall_s"] / floor, 3) if floor else None
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="work directory parent (default: the system's temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    with cleaned_up() as cleanup:
        res = run(args, cleanup)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:<32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
