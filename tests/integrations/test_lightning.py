"""PyTorch Lightning through ckptd's CheckpointIO: a killed trainer resumes bit-identical, from RAM
and then from disk after a daemon restart; the prepare callback makes the first save's slots ahead.

Each trainer is a real process running ``examples/lightning.py worker`` (an MLP with dropout,
Adam, StepLR, a shuffled DataLoader; ModelCheckpoint at every epoch's end through
``CkptdCheckpointIO``). The first is killed as epoch 1 starts (step 4 saved); the second resumes
from the daemon's memory and is killed as epoch 2 starts (step 8 saved); the daemon is killed and
restarted on the same root; the third resumes from disk, finishes epoch 2, and its weights must
equal those of an uninterrupted run of the same seed: only true if both resumes were exact.
"""

from __future__ import annotations

from typing import Any

from ckptd_client import CheckpointManager, Level, SaveHandle

from tests._ckptd_helpers import unique_job
from tests.integrations._framework_kit import run_ranks


def test_killed_trainer_resumes_from_memory_then_from_disk_bit_identical(daemon_factory: Any) -> None:
    d = daemon_factory()
    job = unique_job("pl")
    (first,) = run_ranks("lightning.py", d.addr, job, 1, ["--crash-at-epoch", "1"])
    assert (first["returncode"], first["resumed_from_step"], first["saved_steps"]) == (-9, None, [4])

    (second,) = run_ranks("lightning.py", d.addr, job, 1, ["--crash-at-epoch", "2"])
    assert (second["returncode"], second["resumed_from_step"], second["saved_steps"]) == (-9, 4, [8])
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, gather_peers=False) as m:
        assert m.all_steps() == [4, 8]
        SaveHandle(m, 8).wait(Level.LOCAL_DURABLE, timeout_s=60)
    d.kill()
    d2 = daemon_factory(root=d.root)  # a new shm directory: the daemon's memory is gone

    (third,) = run_ranks("lightning.py", d2.addr, job, 1, ["--reference"])
    assert third["returncode"] == 0, third
    assert (third["resumed_from_step"], third["served_from"], third["global_step"]) == (8, "disk", 12)
    assert third["saved_steps"] == [12]
    assert third["files_written"] == []  # Lightning's paths were only recorded, nothing written there
    assert third["identical"] is True


def test_the_prepare_callback_has_the_first_save_copy_into_slots_made_ahead(daemon_factory: Any, tmp_path: Any) -> None:
    """A real ``Trainer.fit`` (4 batches, Adam, a scheduler, ModelCheckpoint at the epoch's end):
    after the first optimizer step the callback prepares the save's slots; the epoch's save then
    maps nothing (it copies into a prepared slot) and the state it saved fits what was prepared."""
    import warnings

    import pytorch_lightning as pl
    import torch
    from ckptd_client.integrations.lightning import CkptdCheckpointIO, CkptdPrepareSave
    from pytorch_lightning.callbacks import ModelCheckpoint

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=1e-3)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2)]

    class SlowSteps(pl.Callback):  # these batches take milliseconds: let the preparation finish first,
        def on_train_batch_start(self, *args: Any) -> None:  # as it does behind real training steps
            if prep.preparation is not None:
                prep.preparation.wait(60)

    d = daemon_factory()
    data = torch.utils.data.TensorDataset(torch.randn(32, 64), torch.randn(32, 1))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    with CheckpointManager(unique_job("plprep"), rank=0, world_size=1, addr=d.addr, on_error="raise") as m:
        ckpt_io = CkptdCheckpointIO(m)
        prep = CkptdPrepareSave(ckpt_io)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path), plugins=[ckpt_io],
                             callbacks=[prep, SlowSteps(), ModelCheckpoint(str(tmp_path / "ckpt"), every_n_epochs=1)])
        trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=8))
        assert prep.preparation is not None and prep.preparation.wait(60)
        assert prep.preparation.slots_mapped == prep.preparation.slots_ready >= 1
        assert sorted(ckpt_io.paths.values()) == [4]
        assert m._saver.maps.mapped_count == 0  # the save mapped no slot: it copied into a prepared one
        saved = m.handles[-1].nbytes
        assert prep.preparation.nbytes <= saved < prep.preparation.nbytes + (1 << 20), (prep.preparation.nbytes, saved)
