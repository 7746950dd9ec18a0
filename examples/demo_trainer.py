"""One rank of the demo's training job: a tiny causal transformer, AdamW, warmup+cosine LR.

Run by ``examples/demo.py`` as ``world_size`` separate processes (torch.distributed, gloo on
127.0.0.1). It is an ordinary training loop with ckptd added the way a user would add it:

* at start-up, ``CheckpointManager.restore(state)`` fills the model, optimizer, scheduler and
  RNG state in place from the newest committed step (``None`` on a fresh start), and the loop
  continues from the step after it;
* after a restore, ``prepare_save(state)`` has the slots of the first save made and mapped in
  the background (a fresh start has no optimizer state to size them by before its first step);
* after every optimizer step, ``save(step, state)`` stages this rank's state into the daemon's
  shared memory and returns; the daemon drains it to disk in the background.

Everything that decides the numbers is deterministic: one intra-op thread, the model
initialised from ``--seed``, each step's batch generated from ``(seed, step, rank)`` (so a
resumed run sees exactly the batches the lost run would have seen), dropout driven by the
global RNG whose state is part of the checkpoint, and gradients averaged with one all_reduce
(gloo's reduction order is fixed for a given world size, and every rank gets the same sum).

Side channels for the orchestrator, all under ``--workdir``:

* ``progress-rank{R}.jsonl``: one line appended after each save returned (step, loss, stall);
* ``result-rank{R}.json``: written at the end: sha256 of every parameter and optimizer-state
  tensor, the restore's step, tier and time, the median save stall.

``--wait-replicated-at K`` makes the rank wait, after step K's save returned, until its node's
shards of step K are on a peer (Level.REPLICATED) before it reports step K (multi-node demo).

``--hold-after K`` makes the rank linger inside step K+1 (forward done, backward pending) after
step K's save returned, so that the orchestrator's SIGKILL lands at a known point of the run.
Lingering is a sleep: it does not touch the RNG or the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB = 64
SEQ = 32
BATCH = 8
D_MODEL = 64
N_HEADS = 4
N_LAYERS = 2
D_FF = 128
DROPOUT = 0.1
LR = 3e-3
WARMUP = 5
HOLD_LIMIT_S = 60.0  # a rank told to hold exits with an error if nobody kills it by then
REPLICATED_TIMEOUT_S = 60.0  # bound on --wait-replicated-at's wait


class TinyLM(nn.Module):
    """A two-layer causal transformer language model."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.randn(SEQ, D_MODEL) * 0.02)
        layer = nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_FF, DROPOUT, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, N_LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(h))
        return logits


def batch(seed: int, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``rank`` at ``step``: a pure function of (seed, step, rank).

    Sequences follow a noisy rule (each token is the previous one plus a per-sequence stride,
    mod VOCAB), so the model has something to learn and the loss visibly falls.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (BATCH, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    noise = torch.rand(BATCH, SEQ + 1, generator=g) < 0.05
    seq = torch.where(noise, torch.randint(0, VOCAB, seq.shape, generator=g), seq)
    return seq[:, :-1], seq[:, 1:]


def lr_factor(steps: int) -> Any:
    def factor(i: int) -> float:
        if i < WARMUP:
            return (i + 1) / WARMUP
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - WARMUP) / max(1, steps - WARMUP)))

    return factor


def average_gradients(model: nn.Module, world: int) -> None:
    """All-reduce every gradient in one flat buffer (one collective per step), then average.

    Every rank receives the same sum, so the ranks keep bit-identical weights.
    """
    grads = [prm.grad for prm in model.parameters() if prm.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def state_digests(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 of every parameter, and of every tensor in the optimizer state."""
    weights = {name: digest(p) for name, p in model.named_parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    moments: dict[str, str] = {}
    for p, st in opt.state.items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                moments[f"{names[id(p)]}.{key}"] = digest(val)
    return weights, moments


def log(rank: int, msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [rank {rank}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--port", type=int, required=True, help="TCP port of the rendezvous store")
    p.add_argument("--master-addr", default="127.0.0.1", help="host of rank 0's rendezvous store")
    p.add_argument("--node-ranks", default="",
                   help="comma-separated ranks served by this rank's daemon (multi-node); empty: all")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--workdir", type=Path, required=True, help="where progress and result files go")
    p.add_argument("--socket", help="ckptd socket; without it, train with no checkpointing (reference run)")
    p.add_argument("--job", default="demo")
    p.add_argument("--hold-after", type=int, default=-1, help="linger in the step after this one (see docstring)")
    p.add_argument("--wait-replicated-at", type=int, default=-1,
                   help="after this step's save, wait until it is REPLICATED before reporting it")
    a = p.parse_args(argv)
    rank, world = a.rank, a.world_size

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master_addr}:{a.port}", rank=rank, world_size=world)

    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(a.steps))
    # The whole training state: objects with state_dict() are saved through it; the RNG state (it
    # drives dropout) is a uint8 tensor, refreshed before each save and re-installed after a restore.
    state: dict[str, Any] = {"model": model, "optimizer": opt, "scheduler": sched,
                             "rng": torch.get_rng_state(), "step": 0}

    manager = None
    restored: dict[str, Any] | None = None
    start = 1
    if a.socket:
        from ckptd_client import CheckpointManager

        # on_error="raise": the demo wants to see a failed save, not train on without it.
        node_ranks = [int(r) for r in a.node_ranks.split(",") if r] or None
        manager = CheckpointManager(a.job, rank=rank, world_size=world, addr=a.socket, on_error="raise",
                                    node_ranks=node_ranks)
        step = manager.restore(state)
        if step is not None:
            info = manager.last_restore
            assert info is not None
            if state["step"] != step:
                raise RuntimeError(f"restored step {step} but the state says {state['step']}")
            torch.set_rng_state(state["rng"])
            restored = {"step": step, "served_from": info.served_from, "seconds": info.seconds}
            start = step + 1
            log(rank, f"restored step {step} from {info.served_from} in {info.seconds * 1000:.1f} ms")
            # the state has its saved shapes (the optimizer's too): have the slots of the next
            # save made and mapped while training resumes (optional; returns at once)
            manager.prepare_save(state)
        else:
            log(rank, "no checkpoint yet: fresh start")

    a.workdir.mkdir(parents=True, exist_ok=True)
    progress = (a.workdir / f"progress-rank{rank}.jsonl").open("a", buffering=1)
    nbytes = 0
    loss_val = float("nan")
    for step in range(start, a.steps + 1):
        model.train()
        x, y = batch(a.seed, step, rank)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        if step == a.hold_after + 1:
            log(rank, f"holding inside step {step} until killed")
            time.sleep(HOLD_LIMIT_S)
            log(rank, "was told to hold for a kill that never came")
            return 3
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        average_gradients(model, world)
        opt.step()
        sched.step()
        loss_val = loss.item()

        stall = None
        if manager is not None:
            state["step"] = step
            state["rng"] = torch.get_rng_state()
            handle = manager.save(step, state)
            stall, nbytes = handle.stall_s, handle.nbytes
            if step == a.wait_replicated_at:  # multi-node demo: on a peer before the node is lost
                from ckptd_client import Level

                t0 = time.monotonic()
                handle.wait(Level.REPLICATED, timeout_s=REPLICATED_TIMEOUT_S)
                log(rank, f"step {step} is REPLICATED (waited {time.monotonic() - t0:.3f} s)")
        progress.write(json.dumps({"step": step, "loss": loss_val, "stall_s": stall}) + "\n")

    log(rank, f"step {a.steps} done, loss {loss_val:.4f}")
    durable = None
    if manager is not None:
        durable = manager.wait_until_finished(timeout_s=60)
        log(rank, f"step {durable} is LOCAL_DURABLE (fsync'd on the daemon's disk tier)")
    weights, moments = state_digests(model, opt)
    result = {
        "rank": rank,
        "start_step": start,
        "final_step": a.steps,
        "final_loss": loss_val,
        "restored": restored,
        "stall_median_s": manager.stall_median_s() if manager else None,
        "bytes": nbytes,
        "local_durable_step": durable,
        "weights": weights,
        "optimizer": moments,
    }
    tmp = a.workdir / f".result-rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, a.workdir / f"result-rank{rank}.json")
    if manager is not None:
        manager.close()
    dist.barrier()
    dist.destroy_process_group()
    log(rank, "finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
