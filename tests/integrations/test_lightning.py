"""PyTorch Lightning through ckptd's CheckpointIO: a killed trainer resumes bit-identical, from RAM
and then from disk after a daemon restart.

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
