"""What the framework integrations add per save beyond ``CheckpointManager.save`` itself.

    python bench/integrations.py [--n-layer 3] [--n-embd 384] [--reps 10] [--json]

Starts a ``ckptd serve`` of its own, builds a GPT-2 from a config (CPU, no download) with AdamW
state (about 100 MiB of state with the defaults) and times, per save, the Hugging Face
``CkptdCallback.on_step_end`` and the Lightning ``CkptdCheckpointIO.save_checkpoint`` (handed the
checkpoint dict Lightning builds: model, optimizer, scheduler, loops), each measured around the
``CheckpointManager.save`` call inside it: overhead = the integration's time - its save's time
(building the state: ``state_dict()`` calls, RNG states, the trainer state's JSON). Each save
waits for the previous step to be on disk first (outside the timing). The last line is a JSON
object with the medians (``hf_overhead_ms``, ``lightning_overhead_ms``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import ServeProcess  # noqa: E402


class Timed:
    """Wraps a manager's ``save`` to record how long each call took."""

    def __init__(self, manager: Any) -> None:
        self.save = manager.save
        self.seconds: list[float] = []
        manager.save = self

    def __call__(self, step: int, state: Any) -> Any:
        t0 = time.perf_counter()
        handle = self.save(step, state)
        self.seconds.append(time.perf_counter() - t0)
        if not handle.ok:
            raise RuntimeError(f"save of step {step} failed: {handle.error}")
        return handle


def build(n_layer: int, n_embd: int) -> tuple[Any, Any, Any, int]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=6, n_positions=128, vocab_size=8192,
                                       bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(0, 8192, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    tensors = list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values()
                                                   if isinstance(v, torch.Tensor)]
    return model, opt, sched, sum(t.numel() * t.element_size() for t in tensors)


def bench_hf(manager: Any, model: Any, opt: Any, sched: Any, reps: int) -> tuple[list[float], list[float]]:
    from ckptd_client import Level
    from ckptd_client.integrations.hf import CkptdCallback
    from transformers import TrainerControl, TrainerState, TrainingArguments

    timed = Timed(manager)
    cb = CkptdCallback(manager, every_step=True)
    args = TrainingArguments(output_dir=tempfile.gettempdir(), report_to="none", use_cpu=True)
    totals = []
    for step in range(1, reps + 2):
        state = TrainerState(global_step=step)
        t0 = time.perf_counter()
        cb.on_step_end(args, state, TrainerControl(), model=model, optimizer=opt, lr_scheduler=sched)
        totals.append(time.perf_counter() - t0)
        manager.handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=120)
    return totals[1:], timed.seconds[1:]  # the first save maps the slot: not steady state


def bench_lightning(manager: Any, model: Any, opt: Any, sched: Any, reps: int,
                    first_step: int) -> tuple[list[float], list[float]]:
    from ckptd_client import Level
    from ckptd_client.integrations.lightning import CkptdCheckpointIO

    timed = Timed(manager)
    io = CkptdCheckpointIO(manager)
    totals = []
    for i in range(reps + 1):
        step = first_step + i
        checkpoint = {"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.6.6",
                      "state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()],
                      "lr_schedulers": [sched.state_dict()],
                      "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 1, "completed": 0}}}}}
        t0 = time.perf_counter()
        io.save_checkpoint(checkpoint, f"/nonexistent/step={step}.ckpt")
        totals.append(time.perf_counter() - t0)
        manager.handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=120)
    return totals[1:], timed.seconds[1:]


def ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    a = p.parse_args()
    from ckptd_client import CheckpointManager

    work = Path(tempfile.mkdtemp(prefix="ckptd-bench-integ-"))
    shm = Path("/dev/shm") / f"ckptd-bench-integ-{uuid.uuid4().hex[:8]}"
    daemon = ServeProcess("integrations", work / "d.sock", work / "daemon.log",
                          ["--root", str(work / "root"), "--shm-dir", str(shm), "--budget-bytes", "2GiB"])
    try:
        daemon.start()
        model, opt, sched, nbytes = build(a.n_layer, a.n_embd)
        with CheckpointManager(f"bench-{uuid.uuid4().hex[:6]}", rank=0, world_size=1, addr=str(daemon.socket),
                               gather_peers=False) as m:
            hf_total, hf_save = bench_hf(m, model, opt, sched, a.reps)
        with CheckpointManager(f"bench-{uuid.uuid4().hex[:6]}", rank=0, world_size=1, addr=str(daemon.socket),
                               gather_peers=False) as m:
            pl_total, pl_save = bench_lightning(m, model, opt, sched, a.reps, 1)
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    hf_over = [t - s for t, s in zip(hf_total, hf_save)]
    pl_over = [t - s for t, s in zip(pl_total, pl_save)]
    res = {"state_bytes": nbytes, "reps": a.reps, "cpus": os.cpu_count(),
           "hf_callback_ms": ms(hf_total), "hf_save_ms": ms(hf_save), "hf_overhead_ms": ms(hf_over),
           "hf_overhead_max_ms": round(max(hf_over) * 1000, 3),
           "lightning_plugin_ms": ms(pl_total), "lightning_save_ms": ms(pl_save), "lightning_overhead_ms": ms(pl_over),
           "lightning_overhead_max_ms": round(max(pl_over) * 1000, 3)}
    if not a.json:
        print(f"state {nbytes / 2**20:.1f} MiB: HF callback {res['hf_callback_ms']} ms (save {res['hf_save_ms']} ms, "
              f"overhead {res['hf_overhead_ms']} ms); Lightning plugin {res['lightning_plugin_ms']} ms "
              f"(save {res['lightning_save_ms']} ms, overhead {res['lightning_overhead_ms']} ms)")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
