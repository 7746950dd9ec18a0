"""Hugging Face Trainer through ckptd: a killed trainer resumes bit-identical, from RAM and from disk.

Each trainer is a real process running ``examples/hf_trainer.py worker`` (a 2-layer GPT-2 from a
config, CPU, with dropout, a shuffled sampler and a warmup/linear LR schedule, saving every step
through ``CkptdCallback``). A trainer is killed with SIGKILL right after a save; a fresh one
resumes with ``trainer.train(resume_from_checkpoint=True)`` and trains to the end, and its
weights must equal (bit for bit) those of an uninterrupted run of the same seed, computed in the
same process. One process resumes from the daemon's memory (the daemon lives); two processes
(gloo DDP) resume from disk after the daemon was killed and restarted on the same root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptd_client import CheckpointManager, Level, SaveHandle

from tests._ckptd_helpers import unique_job
from tests.integrations._framework_kit import run_ranks


def test_one_process_killed_resumes_from_memory_bit_identical(daemon_factory: Any) -> None:
    d = daemon_factory()
    job = unique_job("hf1")
    (crashed,) = run_ranks("hf_trainer.py", d.addr, job, 1, ["--max-steps", "6", "--crash-at", "3"])
    assert crashed["returncode"] == -9 and crashed["crashed_at"] == 3
    assert crashed["resumed_from_step"] is None  # a fresh start: nothing to resume from yet

    (resumed,) = run_ranks("hf_trainer.py", d.addr, job, 1, ["--max-steps", "6", "--reference"])
    assert resumed["returncode"] == 0, resumed
    assert resumed["resumed_from_step"] == 3
    assert resumed["served_from"] == "memory"
    assert resumed["global_step"] == 6
    assert resumed["identical"] is True
    assert not [f for f in resumed["files_written"] if f.startswith("checkpoint-")]  # no Trainer files
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, gather_peers=False) as m:
        assert m.all_steps()[-1] == 6


def test_two_processes_resume_from_disk_after_daemon_restart(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory()
    job = unique_job("hf2")
    crashed = run_ranks("hf_trainer.py", d.addr, job, 2, ["--max-steps", "5", "--crash-at", "2"])
    assert [r["returncode"] for r in crashed] == [-9, -9]
    assert [r["crashed_at"] for r in crashed] == [2, 2]
    with CheckpointManager(job, rank=0, world_size=2, addr=d.addr, gather_peers=False) as m:
        SaveHandle(m, 2).wait(Level.LOCAL_DURABLE, timeout_s=60)  # every rank's shard on disk
    d.kill()
    d2 = daemon_factory(root=d.root)  # a new shm directory: the daemon's memory is gone

    resumed = run_ranks("hf_trainer.py", d2.addr, job, 2, ["--max-steps", "5", "--reference"])
    for r in resumed:
        assert r["returncode"] == 0, r
        assert (r["resumed_from_step"], r["served_from"], r["global_step"]) == (2, "disk", 5), r
        assert r["identical"] is True, r
    assert [r["rank"] for r in resumed] == [0, 1]
    assert resumed[0]["digest"] == resumed[1]["digest"]  # DDP ranks hold the same weights


def test_the_callback_prepares_the_first_save_after_the_first_step(daemon_factory: Any) -> None:
    """Driven step by step (no Trainer loop): a step that does not save prepares the slots of
    the state a save would hold (the optimizer's state exists by then); the first save maps
    nothing: it copies into a slot prepared for its very size."""
    import torch
    from ckptd_client.integrations.hf import CkptdCallback
    from transformers import TrainerControl, TrainerState, TrainingArguments

    d = daemon_factory()
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()  # the optimizer's state is made at its first step
    args = TrainingArguments(output_dir=str(d.root / "out"), report_to="none", use_cpu=True)
    with CheckpointManager(unique_job("hfprep"), rank=0, world_size=1, addr=d.addr, on_error="raise") as m:
        cb = CkptdCallback(m)
        state = TrainerState(global_step=1)
        cb.on_step_end(args, state, TrainerControl(should_save=False), model=model, optimizer=opt)
        assert cb.preparation is not None and cb.preparation.wait(60)
        assert cb.preparation.slots_mapped == cb.preparation.slots_ready >= 1
        state.global_step = 2
        cb.on_step_end(args, state, TrainerControl(should_save=True), model=model, optimizer=opt)
        assert cb.saved_steps == [2] and m._saver.maps.mapped_count == 0  # into a prepared slot
        assert cb.preparation.nbytes == m.handles[-1].nbytes
