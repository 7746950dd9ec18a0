"""A Hugging Face Trainer checkpointing through ckptd: trains, is killed, resumes, checks the weights.

    python examples/hf_trainer.py              # starts its own daemon; last line: a JSON object

Starts a ``ckptd serve`` of its own, runs a trainer (a 2-layer GPT-2 built from a config, CPU, no
download) that saves every step through ``CkptdCallback`` and is killed (SIGKILL) after step 3,
then a fresh trainer that resumes with ``trainer.train(resume_from_checkpoint=True)`` from the
daemon's memory and trains to step 6, and compares its weights with an uninterrupted run of the
same seed. The last line: ``{"resumed_from_step": 3, "served_from": ..., "identical": true, ...}``.

``worker`` mode is one trainer process (the tests run it directly, also as 2 ranks over gloo with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set):

    python examples/hf_trainer.py worker --addr SOCK --job J --max-steps 6 [--crash-at 3] [--reference]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from _example_util import model_digest, run_example, worker_parser

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model from a config: nothing to download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEQ_LEN = 16
SAMPLES = 24


def tiny_model(seed: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=SEQ_LEN, vocab_size=128, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


class Tokens:
    """A fixed dataset of random token sequences (the same for every run)."""

    def __init__(self) -> None:
        import torch

        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, 128, (SAMPLES, SEQ_LEN), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out_dir: str, max_steps: int, seed: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        warmup_steps=2, seed=seed, save_strategy="steps", save_steps=1, logging_steps=1, report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


def reference(max_steps: int, seed: int) -> str:
    """The weights' digest after an uninterrupted run of the same seed (no ckptd)."""
    from transformers import Trainer

    with tempfile.TemporaryDirectory() as out:
        args = training_args(out, max_steps, seed)
        args.save_strategy = "no"
        trainer = Trainer(model=tiny_model(seed), args=args, train_dataset=Tokens())
        trainer.train()
        return model_digest(trainer.model)


def worker(args: argparse.Namespace) -> int:
    from ckptd_client import CheckpointManager
    from ckptd_client.integrations.hf import CkptdCallback, CkptdTrainer
    from transformers import TrainerCallback

    ref = reference(args.max_steps, args.seed) if args.reference else None
    ckpt = CheckpointManager(args.job, addr=args.addr)
    report: dict[str, Any] = {"rank": ckpt.rank, "world_size": ckpt.world_size}

    class CrashAt(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> Any:
            if state.global_step == args.crash_at:
                report["resumed_from_step"] = trainer.ckptd_resumed_from
                report["served_from"] = ckpt.last_restore.served_from if ckpt.last_restore else None
                print(json.dumps({**report, "crashed_at": state.global_step}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no flush of anything
            return control

    with tempfile.TemporaryDirectory() as out:
        trainer = CkptdTrainer(model=tiny_model(args.seed), args=training_args(out, args.max_steps, args.seed),
                               train_dataset=Tokens(), callbacks=[CkptdCallback(ckpt), CrashAt()])
        trainer.train(resume_from_checkpoint=True)
        report["resumed_from_step"] = trainer.ckptd_resumed_from
        report["served_from"] = ckpt.last_restore.served_from if ckpt.last_restore else None
        report["global_step"] = trainer.state.global_step
        report["digest"] = model_digest(trainer.model)
        report["identical"] = None if ref is None else report["digest"] == ref
        report["files_written"] = sorted(os.listdir(out))
    ckpt.close()
    print(json.dumps(report), flush=True)
    return 0


def main() -> int:
    return run_example(Path(__file__).resolve(), "hf", ["--max-steps", "6", "--crash-at", "3"],
                       ["--max-steps", "6", "--reference"], "crashed_at")


def parse(argv: list[str]) -> argparse.Namespace:
    p, w = worker_parser(__doc__, seed=7)
    w.add_argument("--max-steps", type=int, default=6)
    w.add_argument("--crash-at", type=int, default=-1)
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse(sys.argv[1:])
    sys.exit(worker(ns) if ns.mode == "worker" else main())
