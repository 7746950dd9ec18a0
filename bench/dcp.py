"""DCP's own FileSystemWriter against the ckptd storage plugin, on one FSDP2 state, in one run.

    python bench/dcp.py [--size-mib 512] [--reps 3] [--dir DIR] [--json]

Two ranks (gloo on CPU, one process each) build the same FSDP2-sharded model (``--size-mib`` of
float32 parameters in total, half per rank) and save it with ``dcp.async_save`` through both
backends, alternating per repetition after one untimed warm-up save of each:

  dcp_*    ``FileSystemWriter`` into ``--dir`` (``sync_files=True``: every file fsync'd), with one
           persistent ``DefaultStager`` reused across saves (DCP's strongest configuration on a
           CPU host: ``StagingOptions(use_pinned_memory, use_shared_memory, use_async_staging=False)``,
           non-blocking copies only with an accelerator; pinning needs CUDA, torch ignores it here);
  ckptd_*  ``CkptdStorageWriter`` against a ``ckptd serve`` subprocess whose root is in ``--dir``
           (its disk tier on the same filesystem); the writer is its own stager (the one-argument
           change: no ``async_stager``), copying the state straight into the daemon's slot.

  *_blocked_s  the time the training loop is blocked: the return of ``async_save`` (the state is
               staged; the caller may modify it), the slower rank of each repetition;
  *_durable_s  from the call until the step is durable on local disk: DCP's future resolved (files
               written and fsync'd, metadata written); ckptd's future resolved and the step at
               LOCAL_DURABLE (shards and manifest fsync'd), the slower rank.

Medians are reported with every sample; the last line is one JSON object. The ranks and the
daemon are children of this process (a parent-death guard kills them if it dies); every file the
run wrote is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "client"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _util import MIB, REPO, Cleanup, ServeProcess, median, raise_on_signals  # noqa: E402

from ckptd.core.launch import die_with_parent  # noqa: E402

WIDTH = 1024  # each layer a WIDTH x WIDTH float32 Linear (4 MiB)


def rank_main(ns: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from ckptd_client import CheckpointManager, Level
    from ckptd_client.dcp import CkptdStorageWriter
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ns.port))
    dist.init_process_group("gloo", rank=ns.rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    n_layers = max(1, ns.size_mib * MIB // (WIDTH * WIDTH * 4))
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(n_layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = {"model": model.state_dict()}
    nbytes = sum(t.to_local().numel() * 4 for t in state["model"].values())
    total = [0, 0]
    dist.all_gather_object(total, nbytes)
    options = StagingOptions(use_pinned_memory=True, use_shared_memory=True, use_async_staging=False,
                             use_non_blocking_copy=torch.accelerator.is_available())
    dcp_stager = DefaultStager(options)
    mgr = CheckpointManager(ns.job, addr=ns.addr, on_error="raise")
    samples: dict[str, list[float]] = {k: [] for k in ("dcp_blocked_s", "dcp_durable_s", "ckptd_blocked_s",
                                                        "ckptd_durable_s")}

    def one(kind: str, rep: int) -> tuple[float, float]:
        dist.barrier()
        t0 = time.perf_counter()
        if kind == "dcp":
            path = Path(ns.dir) / f"dcp-{rep}"
            writer: Any = dcp.FileSystemWriter(path, sync_files=True)
        else:
            writer = CkptdStorageWriter(manager=mgr, step=rep + 1, wait_level=None)
        if kind == "dcp":
            fut = dcp.async_save(state, storage_writer=writer, async_stager=dcp_stager)
        else:  # the writer is its own stager: straight into the daemon's slot
            fut = dcp.async_save(state, storage_writer=writer)
        blocked = time.perf_counter() - t0
        fut.result()
        if kind == "ckptd":
            mgr._wait(rep + 1, Level.LOCAL_DURABLE, 600)
        durable = time.perf_counter() - t0
        out: list[Any] = [None, None]
        dist.all_gather_object(out, (blocked, durable))
        if kind == "dcp":
            dist.barrier()
            if ns.rank == 0:
                shutil.rmtree(path, ignore_errors=True)
        return max(b for b, _ in out), max(d for _, d in out)

    for rep in range(ns.reps + 1):
        for kind in ("dcp", "ckptd") if rep % 2 == 0 else ("ckptd", "dcp"):
            blocked, durable = one(kind, rep)
            if rep > 0:  # rep 0 is the warm-up
                samples[f"{kind}_blocked_s"].append(blocked)
                samples[f"{kind}_durable_s"].append(durable)
    dcp_stager.close()
    mgr.close()
    if ns.rank == 0:
        print(json.dumps({"bytes": sum(total), "layers": n_layers, "samples": samples}), flush=True)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where DCP's files and the daemon's disk tier go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--addr", default="", help=argparse.SUPPRESS)
    p.add_argument("--job", default="", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.rank is not None:
        rank_main(ns)
        return 0
    raise_on_signals()
    cleanup = Cleanup()
    try:
        base = Path(tempfile.mkdtemp(prefix="ckptd-bench-dcp-", dir=ns.dir))
        cleanup.add("remove the run's files", lambda: shutil.rmtree(base, ignore_errors=True))
        shm = Path("/dev/shm") / f"ckptd-bench-dcp-{uuid.uuid4().hex[:8]}"
        cleanup.add("remove the daemon's shm", lambda: shutil.rmtree(shm, ignore_errors=True))
        sock = Path(tempfile.mkdtemp(prefix="ckb-", dir="/tmp")) / "d.sock"
        cleanup.add("remove the socket dir", lambda: shutil.rmtree(sock.parent, ignore_errors=True))
        budget = 3 * ns.size_mib * MIB + 64 * MIB  # two slots per rank and room to spare
        daemon = ServeProcess("dcp", sock, base / "daemon.log",
                              ["--root", str(base / "root"), "--shm-dir", str(shm), "--budget-bytes", str(budget)])
        daemon.start()
        cleanup.add("stop the daemon", daemon.stop)
        port, job = free_port(), f"bench-dcp-{uuid.uuid4().hex[:6]}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "client")]))
        procs = [subprocess.Popen(die_with_parent([sys.executable, __file__, "--rank", str(r), "--port", str(port),
                                                   "--addr", str(sock), "--job", job, "--dir", str(base),
                                                   "--size-mib", str(ns.size_mib), "--reps", str(ns.reps)]),
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=REPO) for r in range(2)]
        outs = [proc.communicate(timeout=1800)[0] for proc in procs]
        if any(proc.returncode for proc in procs):
            raise RuntimeError(f"a rank failed: {[proc.returncode for proc in procs]}\n{daemon.log_tail()}")
        res = json.loads(outs[0].strip().splitlines()[-1])
    finally:
        cleanup.run()
    s = res.pop("samples")
    report: dict[str, Any] = dict(res, reps=ns.reps, **{k: median(v) for k, v in s.items()}, samples=s)
    for what in ("blocked", "durable"):
        c, d = report[f"ckptd_{what}_s"], report[f"dcp_{what}_s"]
        report[f"{what}_ratio"] = c / d if c is not None and d else None
        # paired: both backends saved back to back in each repetition, under the same conditions
        report[f"{what}_ratio_per_rep"] = [x / y for x, y in zip(s[f"ckptd_{what}_s"], s[f"dcp_{what}_s"]) if y]
    if not ns.json:
        for k in ("bytes", "dcp_blocked_s", "ckptd_blocked_s", "blocked_ratio", "dcp_durable_s", "ckptd_durable_s",
                  "durable_ratio"):
            print(f"{k:>16}: {report[k]}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
