"""How long does a checkpoint save stall training, and how fast does it reach the disk?

One run measures, on one GPT-like state (``--size-mib``, default 1024; 304 tensors: bf16 model
weights plus fp32 master weights and Adam ``exp_avg``/``exp_avg_sq``), ``--reps`` repetitions
of each method after ``--warmup`` untimed ones (at most 2 for DCP and 1 for torch.save, whose
warm-ups write whole checkpoints to disk), and reports medians (every sample is in the JSON):

Save stall (the time the training loop is blocked), against the memcpy floor:
  floor_s               bare copy of the same bytes, tensor by tensor, into a /dev/shm file that
                        was posix_fallocate'd, mmap'ed and madvise(MADV_POPULATE_WRITE)'d before
                        timing and is reused (ckptd's shard layout, 64-byte aligned offsets). Two
                        copy engines are timed, torch ``Tensor.copy_`` into pre-built views and
                        ``ctypes.memmove``; floor_s is the faster median.
  ckptd_stall_s         ``CheckpointManager.save`` against a real ``ckptd serve`` subprocess
                        whose budget holds exactly two slots; warm-up saves first, so slots and the
                        client's mappings are reused; each timed save is of a new, increasing step
                        and is drained to LOCAL_DURABLE before the next (no back-pressure waits).
  torch_save_s          ``torch.save`` of the state to a file in ``--dir``, plus its fsync.
  dcp_async_blocking_s  ``torch.distributed.checkpoint.async_save`` (world size 1, gloo process
                        group, file:// init) with one persistent ``DefaultStager`` reused across
                        saves, ``StagingOptions(use_pinned_memory=True, use_shared_memory=True)``
                        (pinning needs CUDA; torch ignores it on a CPU-only host and the JSON
                        says so). Two variants: synchronous staging, where the call blocks until
                        the state is copied; and ``use_async_staging=True``, where the call
                        returns first and the caller must wait for ``staging_completion`` before
                        it may modify the state. The figure is the time until the caller may
                        modify the state again, the better of the two variants; the bare return
                        time of the async-staging call is reported as dcp_async_call_return_s.
                        Each save's upload future is awaited before the next save.
  dlrover_stall_s       DLRover Flash Checkpoint, ``DdpCheckpointer.save_checkpoint(...,
                        storage_type=StorageType.MEMORY)``, standalone: no elastic agent, so the
                        checkpointer forks its own saver process (``start_saver_process``); a
                        private TORCHELASTIC_RUN_ID isolates its sockets and shared memory.
  DCP and DLRover run in child processes (each builds the same state from the same seed):
  process groups and a forked saver must not share a process with the gRPC client. The DLRover
  child is driven save by save, so its saves are interleaved with ckptd's (see below).

Restore from the daemon's memory tier, after the save repetitions (``_stall_restore``):
  restore_floor_s       the same bytes copied back from the floor's pre-faulted mapping into the
                        state's tensors: the faster median of torch ``copy_`` tensor by tensor
                        (restore_floor_torch_s) and 4 MiB pieces over a thread pool
                        (restore_floor_pooled_s).
  restore_memory_s      ``CheckpointManager.restore(state)`` of the newest step, in place, served
                        by the memory tier (``restore_served_from`` says which tier served it),
                        by the manager that saved it (it reads through its saves' mapping);
                        restore_memory_over_floor_paired: the median of each round's restore
                        over that round's faster floor.
  restore_memory_new_manager_s  the same by a manager made just before (the slot mapped anew, as
                        by a trainer restarted after a crash).

Per tensor (``--tensors N``: a state of N small fp32 tensors of ``--tensor-elems`` elements
instead of the GPT-like one; the peers are skipped): ``per_tensor_save_us`` is
(ckptd_stall_s - floor_s) / tensors and ``per_tensor_restore_us`` (restore_memory_s -
restore_floor_s) / tensors, in microseconds. ``ckptd_warmup_stalls_s`` are the warm-up saves'
stalls (the first ones fill new slots); ``ckptd_first_save_over_steady`` the first against the
median. The same first save with its slots prepared ahead (``_stall_prepared``: a second daemon,
a new job, ``prepare_save(state)`` waited for, then its first save): ``ckptd_prepare_s`` (the
wait for the preparation), ``ckptd_prepared_first_save_s`` and
``ckptd_prepared_first_save_over_steady`` (against the same median; against that daemon's own
later saves, taken in the same minute: ``ckptd_prepared_first_save_over_its_later``).

Disk drain, against the fsync floor:
  fsync_buffered_s      the same bytes (the shard's size) written sequentially in 8 MiB blocks
                        with write(2) to a new file in ``--dir``, then fsync.
  fsync_direct_s        the same with O_DIRECT: 8 MiB page-aligned blocks from the /dev/shm
                        mapping, the unaligned tail (if any) buffered, then fsync.
  fsync_floor_s         the faster of the two medians.
  ckptd_drain_s         from the return of ``save`` to ``wait(Level.LOCAL_DURABLE)`` returning:
                        the daemon's checksum of the slot plus its disk commit (shard file,
                        fsyncs, link, manifest). ckptd_drain_daemon_s is the daemon's own figure
                        for the disk commit alone, parsed from its "LOCAL_DURABLE" log line.
  Each repetition runs the floor copies, one ckptd save and its drain, one DLRover save, then one
  buffered and one O_DIRECT write, so these methods see the same machine conditions (paired
  per-repetition ratios are reported too); files are deleted after use. torch.save and DCP
  follow the repetitions. On a loaded host the figures swing widely: the load average before
  and after, and per repetition, is in the JSON.

Output: a table on stdout and, with ``--json``, a last line holding one JSON object (medians,
every sample, ratios, and the machine context). ``--shm-dir`` puts the daemon's slots and the
floor's mapping on another tmpfs (its mount options are in the JSON: ``huge=`` says whether huge
pages back them). The daemon, temp files and shared-memory files are
removed on exit, also after an error or SIGTERM. ``--skip-peers`` skips torch.save, DCP and
DLRover; ``--quick`` is ``--size-mib 64 --reps 3 --warmup 2``.

    .venv/bin/python bench/stall.py --json
    .venv/bin/python bench/stall.py --size-mib 32 --reps 2 --json --skip-peers
    .venv/bin/python bench/stall.py --tensors 100000 --reps 3 --json

This file is the command line and the run; the pieces live beside it: ``_stall_floor`` (the
memcpy and fsync floors), ``_stall_daemon`` (the ckptd daemon), ``_stall_peers`` (DCP, DLRover,
torch.save) and ``_stall_report`` (summary, table, log), ``_stall_restore`` (the restore series),
``_stall_prepared`` (the prepared first save); ``_util`` builds the state.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _stall_daemon import SLOT_ALIGN, serve_with_manager, stall_diagnostics
from _stall_floor import FloorCopier, write_buffered, write_direct
from _stall_peers import DlroverPeer, child_main, run_child, torch_save_series
from _stall_prepared import prepared_first_save
from _stall_report import (
    log,
    machine_context,
    summarize_core,
    summarize_dcp,
    summarize_dlrover,
    summarize_per_tensor,
    summarize_ratios,
    table,
)
from _stall_restore import restore_series
from _util import (
    MIB,
    REPO,
    Cleanup,
    ShmFile,
    cleaned_up,
    gpt_state,
    many_tensors_state,
    median,
    mount_options,
    packed_offsets,
    same_filesystem,
    tensors_of,
)

PEERS = ("torch_save", "dcp", "dlrover")


def default_base_dir() -> Path:
    tmp = Path(tempfile.gettempdir())
    return tmp if same_filesystem(tmp, REPO) else REPO


def run(args: argparse.Namespace, cleanup: Cleanup) -> dict[str, Any]:
    from ckptd_client import Level

    peers = [] if args.skip_peers else [p for p in args.peers.split(",") if p]
    base = Path(args.dir) if args.dir else default_base_dir()
    workdir = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=base))
    cleanup.add("work dir", lambda: shutil.rmtree(workdir, ignore_errors=True))
    tag = uuid.uuid4().hex[:10]
    ctx = machine_context(workdir)

    # DLRover builds its own copy of the state in a child while we build ours
    dl = DlroverPeer(args, workdir, cleanup, tag) if "dlrover" in peers else None

    if args.tensors:
        log(f"building a state of {args.tensors} fp32 tensors of {args.tensor_elems} elements in {workdir}")
        state, info = many_tensors_state(args.tensors, args.tensor_elems, args.seed)
    else:
        log(f"building a {args.size_mib} MiB GPT-like state in {workdir}")
        state, info = gpt_state(args.size_mib * MIB, args.seed)
    tensors = tensors_of(state)
    offsets, layout_bytes = packed_offsets(tensors)
    res: dict[str, Any] = {
        "bench": "stall", "bytes": info.nbytes, "layout_bytes": layout_bytes,
        "size_mib": round(info.nbytes / MIB, 2) if args.tensors else args.size_mib,
        "tensors": len(tensors), "reps": args.reps, "warmup": args.warmup,
        "state": {"kind": "many_small" if args.tensors else "gpt", "d_model": info.d_model, "vocab": info.vocab,
                  "n_layer": info.n_layer, "params": info.n_params, "tensor_elems": args.tensor_elems,
                  "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors})},
    }

    # the floor's mapping, pre-faulted before any timing
    shm_base = Path(args.shm_dir)
    res["shm_dir"], res["shm_mount_options"] = str(shm_base), mount_options(shm_base)
    floor_shm = ShmFile(shm_base / f"ckptd-bench-floor-{tag}", layout_bytes)
    cleanup.add("floor shm file", floor_shm.close)
    res["floor_prefaulted_with"] = "madvise(MADV_POPULATE_WRITE)" if floor_shm.populated else "touching every page"
    copier = FloorCopier(tensors, offsets, floor_shm)
    cleanup.add("floor views", copier.close)

    # a ckptd daemon with room for exactly two slots of this shard
    slot = (layout_bytes + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
    budget = 2 * slot + 2 * SLOT_ALIGN
    sock_dir = Path(tempfile.mkdtemp(prefix="ckb-", dir="/tmp"))
    cleanup.add("socket dir", lambda: shutil.rmtree(sock_dir, ignore_errors=True))
    shm_dir = shm_base / f"ckptd-bench-{tag}"
    daemon, mgr = serve_with_manager(cleanup, "ckptd", workdir / "ckptd-root", shm_dir, sock_dir / "ckptd.sock",
                                     budget, workdir / "ckptd.log", "bench")
    res["ckptd_budget_bytes"] = budget
    res["temp_paths"] = [str(workdir), str(floor_shm.path), str(shm_dir), str(sock_dir)]  # all removed on exit

    from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb

    def daemon_slots() -> int:
        return int(mgr.conn.call(mgr.conn.stub.DaemonStatus, pb.DaemonStatusRequest()).slots)

    if dl is not None:
        dl.wait_ready()

    def dlrover_save() -> float | None:
        return dl.save() if dl is not None else None

    durable_timeout = 120 + 2.0 * res["size_mib"] + len(tensors) / 1000
    step = 0
    log(f"warm-up: {max(args.warmup, 1)} saves of each in-memory method, one write of each kind")
    warm_stalls: list[float] = []
    for _ in range(max(args.warmup, 1)):
        step += 1
        copier.torch_copy()
        copier.memmove()
        h = mgr.save(step, state)
        warm_stalls.append(h.stall_s)
        h.wait(Level.LOCAL_DURABLE, timeout_s=durable_timeout)
        dlrover_save()
    res["ckptd_warmup_stalls_s"] = [round(x, 6) for x in warm_stalls]  # the first save into each new slot
    for name, fn in (("buffered", write_buffered), ("direct", write_direct)):
        p = workdir / f"warm-{name}.bin"
        with contextlib.suppress(OSError):
            fn(p, memoryview(floor_shm.mm)[:layout_bytes])
        p.unlink(missing_ok=True)
    res["ckptd_slots_after_warmup"] = daemon_slots()

    s: dict[str, list[float]] = {k: [] for k in (
        "floor_torch_copy", "floor_memmove", "ckptd_stall", "ckptd_stall_client", "ckptd_begin_save",
        "ckptd_drain", "dlrover_stall", "fsync_buffered", "fsync_direct")}
    paired_floor: list[float] = []
    paired_dl: list[float] = []
    direct_error: str | None = None
    timed_steps: list[int] = []
    load_per_rep: list[float] = []
    for rep in range(args.reps):
        load_per_rep.append(os.getloadavg()[0])
        s["floor_torch_copy"].append(copier.torch_copy())
        s["floor_memmove"].append(copier.memmove())
        step += 1
        t0 = time.perf_counter()
        h = mgr.save(step, state)
        t1 = time.perf_counter()
        h.wait(Level.LOCAL_DURABLE, timeout_s=durable_timeout)
        t2 = time.perf_counter()
        timed_steps.append(step)
        s["ckptd_stall"].append(t1 - t0)
        s["ckptd_stall_client"].append(h.stall_s)
        s["ckptd_begin_save"].append(h.waited_s)
        s["ckptd_drain"].append(t2 - t1)
        paired_floor.append((t1 - t0) / min(s["floor_torch_copy"][-1], s["floor_memmove"][-1]))
        dl_s = dlrover_save()
        if dl_s is not None:
            s["dlrover_stall"].append(dl_s)
            paired_dl.append((t1 - t0) / dl_s)
        src = memoryview(floor_shm.mm)[:layout_bytes]
        p = workdir / f"fsync-buffered-{rep}.bin"
        s["fsync_buffered"].append(write_buffered(p, src))
        p.unlink()
        p = workdir / f"fsync-direct-{rep}.bin"
        try:
            s["fsync_direct"].append(write_direct(p, src))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct_error = f"O_DIRECT not supported here: {exc}"
        p.unlink(missing_ok=True)
        src.release()
        log(f"rep {rep + 1}/{args.reps}: floor {min(s['floor_torch_copy'][-1], s['floor_memmove'][-1]):.4f}s "
            f"ckptd stall {t1 - t0:.4f}s drain {t2 - t1:.3f}s"
            + (f" dlrover {dl_s:.4f}s" if dl_s is not None else "")
            + f" fsync buffered {s['fsync_buffered'][-1]:.3f}s"
            + (f" direct {s['fsync_direct'][-1]:.3f}s" if s["fsync_direct"] else ""))
    res["ckptd_slots_after_timed"] = daemon_slots()
    if dl is not None:
        dl.close()
    restore_series(res, s, mgr, state, copier, args.reps)

    summarize_core(res, s, stall_diagnostics(mgr, state, daemon_slots), daemon, timed_steps, direct_error)
    log("prepared first save: prepare_save on a second daemon, then its first save")
    prepared_first_save(res, state, workdir, sock_dir, tag, budget, durable_timeout, args.reps, shm_base)
    res["ckptd_stall_over_floor_paired"] = median(paired_floor)
    summarize_dlrover(res, s["dlrover_stall"], paired_dl, dl.info if dl is not None else {}, "dlrover" in peers)

    res["torch_save_s"] = None
    if "torch_save" in peers:
        ts = torch_save_series(state, workdir, args)
        res["torch_save_s"], res["torch_save_all_s"] = median(ts), [round(x, 6) for x in ts]
    res["dcp_async_blocking_s"] = None
    if "dcp" in peers:
        log("torch.distributed.checkpoint.async_save (child process)")
        summarize_dcp(res, run_child("dcp", args, workdir, cleanup))

    summarize_ratios(res)
    summarize_per_tensor(res)
    ctx["loadavg_end"] = list(os.getloadavg())
    ctx["loadavg_1min_per_rep"] = load_per_rep
    res["machine"] = ctx
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=1024, help="state size in MiB (default 1024)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per method (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed saves before timing (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensors", type=int, default=0,
                   help="a state of N small fp32 tensors instead of the GPT-like one (implies --skip-peers)")
    p.add_argument("--tensor-elems", type=int, default=256, help="elements per tensor with --tensors (default 256)")
    p.add_argument("--dir", help="directory on the disk to measure (default: /tmp if it is on the "
                                 "repository's filesystem, else the repository)")
    p.add_argument("--shm-dir", default="/dev/shm",
                   help="tmpfs for the daemon's slots and the floor's mapping (default /dev/shm; e.g. one mounted "
                        "with huge=within_size to measure huge pages)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="--size-mib 64 --reps 3 --warmup 2")
    p.add_argument("--skip-peers", action="store_true", help="skip torch.save, DCP and DLRover")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--child-timeout", type=float, default=0, help="seconds per peer child (default: by size)")
    p.add_argument("--child", choices=("dcp", "dlrover"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--reply-fd", type=int, default=-1, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.quick:
        ns.size_mib, ns.reps, ns.warmup = 64, 3, 2
    if ns.reps < 1 or ns.warmup < 0 or ns.size_mib < 8 or ns.tensors < 0 or ns.tensor_elems < 1:
        p.error("need --reps >= 1, --warmup >= 0, --size-mib >= 8, --tensors >= 0 and --tensor-elems >= 1")
    if ns.tensors:
        ns.skip_peers = True  # the peers' children build the GPT-like state
    unknown = set(ns.peers.split(",")) - set(PEERS) - {""}
    if unknown:
        p.error(f"unknown peers: {', '.join(sorted(unknown))}")
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    with cleaned_up() as cleanup:
        res = run(args, cleanup)
    print(table(res), flush=True)
    if args.json:
        print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
