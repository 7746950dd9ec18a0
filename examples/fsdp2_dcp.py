"""FSDP2 + AdamW saved through torch.distributed.checkpoint into ckptd, killed, resumed on another world size.

CPU only, gloo on 127.0.0.1. What it does:

1. starts one ``ckptd serve`` daemon (private root, socket and /dev/shm directory);
2. trains a small transformer with FSDP2 (``fully_shard``) and AdamW on ``--world-size`` ranks
   (default 2), saving after every step with ``dcp.async_save(state,
   storage_writer=CkptdStorageWriter(job, step))``: the one-argument change from a file-system
   checkpoint. Before each save every rank records the sha256 of every global tensor of the state;
3. SIGKILLs every trainer once step ``--kill-at`` was saved;
4. restarts the job on ``--world-size-after`` ranks (default 1): ``dcp.load(state,
   storage_reader=CkptdStorageReader(job))`` reshards the newest committed step onto the new
   mesh (model and optimizer, through ``get_state_dict``/``set_state_dict``), the digests are
   compared with those recorded at that step, and training continues for ``--more-steps``,
   saving with ``allow_new_world_size=True`` (the explicit opt-in for a job resumed on another
   number of ranks).

The last line is one JSON object: ``identical`` (the restored state equals the saved one, bit for
bit), ``world_size_before``, ``world_size_after``, ``restored_from`` (step and tier),
``stall_ms_median`` (the time ``async_save`` blocked the loop) and ``steps_after``.
Usage: ``python examples/fsdp2_dcp.py [--world-size 2] [--world-size-after 1] [--kill-at 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "client")]

from _example_util import state_digests  # noqa: E402


def trainer(ns: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from ckptd_client import CheckpointManager, Level
    from ckptd_client.dcp import CkptdStorageReader, CkptdStorageWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ns.port))
    dist.init_process_group("gloo", rank=ns.rank, world_size=ns.ranks)
    mesh = init_device_mesh("cpu", (ns.ranks,))
    # async_save plans with collectives from its background thread: its own group, so they never
    # interleave with the training loop's collectives (FSDP's all-gathers) on the default group
    ckpt_group = dist.new_group(backend="gloo")
    torch.manual_seed(0)
    layers = [torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True) for _ in range(2)]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 8))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = Path(ns.out)
    resumed = ns.phase == "after"
    mgr = CheckpointManager(ns.job, addr=ns.addr, allow_new_world_size=resumed, on_error="raise")
    start, report = 0, {}
    if resumed:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        reader = CkptdStorageReader(manager=mgr)
        dcp.load(state, storage_reader=reader)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        step = reader.loaded_step
        assert step is not None
        saved = json.loads((out / f"digest-{step}.json").read_text())
        msd, osd = get_state_dict(model, opt)
        report = {"identical": state_digests({"model": msd, "optim": osd}) == saved, "restored_step": step,
                  "restored_from": sorted(set(reader.served_from.values()))}
        start = step + 1
    stalls, pending = [], None
    for step in range(start, start + (ns.more_steps if resumed else 10_000)):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, 32, generator=g), torch.randn(8, 6, 8, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if pending is not None:
            pending.result()  # DCP allows one async save in flight
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        d = state_digests(state)
        if ns.rank == 0:
            (out / f"digest-{step}.json").write_text(json.dumps(d))
        t0 = time.perf_counter()
        pending = dcp.async_save(state, storage_writer=CkptdStorageWriter(manager=mgr, step=step),
                                 process_group=ckpt_group)
        stalls.append(time.perf_counter() - t0)
        if ns.rank == 0:
            with open(out / f"progress-{ns.phase}", "a") as f:
                f.write(f"{step} {stalls[-1]}\n")
    if pending is not None:
        pending.result()
    mgr.wait_until_finished(Level.LOCAL_DURABLE, timeout_s=120)
    if ns.rank == 0:
        (out / "after.json").write_text(json.dumps(dict(report, steps_after=ns.more_steps)))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(ns: argparse.Namespace, phase: str, ranks: int, addr: str, job: str,
           out: Path) -> list[subprocess.Popen[bytes]]:
    port = free_port()
    log = open(out / f"trainers-{phase}.log", "ab")  # noqa: SIM115 - the trainers' own output, kept with the run
    return [subprocess.Popen([sys.executable, __file__, "--trainer", phase, "--rank", str(r), "--ranks", str(ranks),
                              "--port", str(port), "--addr", addr, "--job", job, "--out", str(out),
                              "--more-steps", str(ns.more_steps)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            for r in range(ranks)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--world-size-after", type=int, default=1)
    p.add_argument("--kill-at", type=int, default=4)
    p.add_argument("--more-steps", type=int, default=2)
    for a in ("--trainer", "--addr", "--job", "--out"):
        p.add_argument(a, help=argparse.SUPPRESS)
    for a in ("--rank", "--ranks", "--port"):
        p.add_argument(a, type=int, default=0, help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.trainer:
        ns.phase = ns.trainer
        trainer(ns)
        return 0
    from ckptd_client.rpc import wait_until_serving

    work = Path(tempfile.mkdtemp(prefix="ckptd-fsdp2-"))
    shm = Path("/dev/shm") / f"ckptd-fsdp2-{uuid.uuid4().hex[:8]}"
    sock = work / "d.sock"
    daemon = subprocess.Popen([sys.executable, "-m", "ckptd.daemon.cli", "serve", "--root", str(work / "root"),
                               "--socket", str(sock), "--shm-dir", str(shm), "--budget-bytes", "256MiB"],
                              stdout=open(work / "daemon.log", "wb"), stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until_serving(sock, 60, exit_code=daemon.poll)
        job = f"fsdp2-{uuid.uuid4().hex[:6]}"
        before = launch(ns, "before", ns.world_size, str(sock), job, work)
        progress = work / "progress-before"
        while not (progress.exists() and len(progress.read_text().splitlines()) > ns.kill_at + 1):
            if any(t.poll() is not None for t in before):
                raise RuntimeError("a trainer exited before it was killed:\n"
                                   + (work / "trainers-before.log").read_text()[-3000:])
            time.sleep(0.05)
        for t in before:
            t.send_signal(signal.SIGKILL)
        for t in before:
            t.wait()
        stalls = [float(line.split()[1]) for line in progress.read_text().splitlines()]
        after = launch(ns, "after", ns.world_size_after, str(sock), job, work)
        if any(t.wait(600) for t in after):
            raise RuntimeError("the resumed run failed:\n" + (work / "trainers-after.log").read_text()[-3000:])
        res = json.loads((work / "after.json").read_text())
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"identical": res["identical"], "world_size_before": ns.world_size,
                      "world_size_after": ns.world_size_after,
                      "restored_from": {"step": res["restored_step"], "tier": "+".join(res["restored_from"])},
                      "stall_ms_median": round(statistics.median(stalls) * 1000, 2),
                      "steps_after": res["steps_after"]}))
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
