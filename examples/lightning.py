"""PyTorch Lightning checkpointing through ckptd: trains, is killed, resumes, checks the weights.

    python examples/lightning.py               # starts its own daemon; last line: a JSON object

Starts a ``ckptd serve`` of its own, runs a trainer (a small MLP with dropout, Adam, a StepLR
schedule, a shuffled DataLoader; 4 steps an epoch) whose ``ModelCheckpoint`` saves at every
epoch's end through ``CkptdCheckpointIO`` (``CkptdPrepareSave`` makes the first save's slots
ahead), kills it (SIGKILL) as its third epoch starts, then
runs a fresh trainer that resumes with ``trainer.fit(model, ckpt_path=ckpt_io.resume_path())``
from the daemon's memory, and compares its weights with an uninterrupted run of the same seed.
The last line: ``{"resumed_from_step": 8, "served_from": ..., "identical": true, ...}``.

``worker`` mode is one trainer process (the tests run it directly):

    python examples/lightning.py worker --addr SOCK --job J [--epochs 3] [--crash-at-epoch 2] [--reference]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from _example_util import model_digest, run_example, worker_parser


def make_module() -> Any:
    import pytorch_lightning as pl
    import torch

    class TinyRegressor(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                           torch.nn.Linear(32, 1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}

        def train_dataloader(self) -> Any:
            g = torch.Generator().manual_seed(99)
            x = torch.randn(32, 8, generator=g)
            ds = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
            return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)

    return TinyRegressor()


def fit(out: str, epochs: int, seed: int, plugins: list[Any], callbacks: list[Any], ckpt_path: str | None) -> Any:
    import pytorch_lightning as pl

    pl.seed_everything(seed, verbose=False)
    model = make_module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out,
                         plugins=plugins, callbacks=callbacks, enable_checkpointing=bool(plugins))
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def worker(args: argparse.Namespace) -> int:
    import pytorch_lightning as pl
    from ckptd_client import CheckpointManager
    from ckptd_client.integrations.lightning import CkptdCheckpointIO, CkptdPrepareSave
    from pytorch_lightning.callbacks import ModelCheckpoint

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    ref = None
    if args.reference:
        with tempfile.TemporaryDirectory() as out:
            ref = model_digest(fit(out, args.epochs, args.seed, [], [], None)[1])
    ckpt = CheckpointManager(args.job, addr=args.addr, rank=0, world_size=1)
    ckpt_io = CkptdCheckpointIO(ckpt)
    report: dict[str, Any] = {}

    class CrashAt(pl.Callback):  # type: ignore[misc]
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            if trainer.current_epoch == args.crash_at_epoch:
                report.update(resumed_from_step=ckpt_io.resumed_from, saved_steps=sorted(ckpt_io.paths.values()))
                print(json.dumps({**report, "crashed_at_epoch": trainer.current_epoch}), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    with tempfile.TemporaryDirectory() as out:
        checkpoints = ModelCheckpoint(dirpath=out, every_n_epochs=1, save_top_k=-1)
        callbacks = [checkpoints, CrashAt(), CkptdPrepareSave(ckpt_io)]  # the last: first save's slots made ahead
        trainer, model = fit(out, args.epochs, args.seed, [ckpt_io], callbacks, ckpt_io.resume_path())
        report.update(resumed_from_step=ckpt_io.resumed_from, global_step=trainer.global_step,
                      served_from=ckpt.last_restore.served_from if ckpt.last_restore else None,
                      saved_steps=sorted(ckpt_io.paths.values()), files_written=sorted(os.listdir(out)))
    report["digest"] = model_digest(model)
    report["identical"] = None if ref is None else report["digest"] == ref
    ckpt.close()
    print(json.dumps(report), flush=True)
    return 0


def main() -> int:
    return run_example(Path(__file__).resolve(), "pl", ["--crash-at-epoch", "2"], ["--reference"], "crashed_at_epoch")


def parse(argv: list[str]) -> argparse.Namespace:
    p, w = worker_parser(__doc__, seed=11)
    w.add_argument("--epochs", type=int, default=3)
    w.add_argument("--crash-at-epoch", type=int, default=-1)
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse(sys.argv[1:])
    sys.exit(worker(ns) if ns.mode == "worker" else main())
