"""Hugging Face ``Trainer`` on ckptd: a callback that saves, a mixin that resumes.

    ckpt = CheckpointManager("my-job")
    trainer = CkptdTrainer(model=model, args=args, train_dataset=ds, callbacks=[CkptdCallback(ckpt)])
    trainer.train(resume_from_checkpoint=True)   # ckptd's newest committed step, or a fresh start

Saving (``CkptdCallback``): at the trainer's save steps (``save_strategy``/``save_steps``), or at
every step with ``every_step=True``, ``on_step_end`` saves one step through
``CheckpointManager.save``: ``{"model": model.state_dict(), "optimizer": ..., "scheduler": ...,
"rng": {python, numpy, cpu}, "trainer_state": <TrainerState JSON>, "model_config": <config JSON>}``
(``ckptctl export`` writes the last as ``config.json``), and clears ``control.should_save`` so
the Trainer writes no checkpoint files of its own. Every rank saves its own shard (its RNG states
differ). ``on_train_end`` waits until the newest save is on local disk. At the end of the first
step that does not save, the callback calls ``CheckpointManager.prepare_save`` with the state a
save would hold, so the first save finds its slots made and mapped (save/prep.py); not in
``on_train_begin``: torch optimizers make their state at their first step, so the shard's size
is known only then (with ``every_step=True`` the first save comes first and takes the cold path).

Resuming (``CkptdResumeMixin``, or ``CkptdTrainer`` = the mixin on ``Trainer``): the Trainer's
own resume path runs unchanged (trainer state, epochs and batches skipped, the same data order,
RNG re-synchronised at the same point), with its ``_load_*`` steps served by ckptd:
``train(resume_from_checkpoint=True)`` picks ckptd's newest committed step (agreed by every rank
under torch.distributed), writes only that step's ``trainer_state.json`` (read from the manifest,
no tensor read) into a small resume directory the Trainer reads, and, once the optimizer and
scheduler exist, restores model (in place), optimizer, scheduler and RNG states in one
``restore`` of that exact step. The state handed to ``restore`` is the step's own structure
(``saved.saved_template``) with the live model's tensors in it: no key is added or dropped.

The Trainer's log entry for a save step is written after ``on_step_end``; a resumed run's
``log_history`` therefore lacks the entry of the step it resumed from (weights, optimizer,
scheduler, RNG and step counters are exact).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptd.core.errors import InvalidArgument
from ckptd.core.types import Level
from ckptd_client.agreement import agree_latest
from ckptd_client.integrations.rng import rng_states, set_rng_states
from ckptd_client.integrations.saved import build, saved_shard, saved_value
from ckptd_client.manager import CheckpointManager
from ckptd_client.save.prep import SavePreparation

TRAINER_STATE_NAME = "trainer_state.json"
RESUME_MARK = "ckptd-resume.json"


def _optimizer(opt: Any) -> Any:
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one


def trainer_checkpoint(model: Any, optimizer: Any, scheduler: Any, state: TrainerState) -> dict[str, Any]:
    """The state one save holds (see module docstring)."""
    out: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        out["optimizer"] = _optimizer(optimizer).state_dict()
    if scheduler is not None:
        out["scheduler"] = scheduler.state_dict()
    out["rng"] = rng_states()
    out["trainer_state"] = json.dumps(dataclasses.asdict(state), sort_keys=True)
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "to_json_string", None)):
        out["model_config"] = config.to_json_string()  # `ckptctl export` writes it as config.json
    return out


class CkptdCallback(TrainerCallback):
    """Save the Trainer's state through ckptd at its save steps (or every step)."""

    def __init__(self, manager: CheckpointManager, *, every_step: bool = False,
                 wait_at_end: Level | None = Level.LOCAL_DURABLE) -> None:
        self.manager = manager
        self.every_step = every_step
        self.wait_at_end = wait_at_end
        self.saved_steps: list[int] = []
        self.preparation: SavePreparation | None = None  # the save slots prepared after the first step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        if not (control.should_save or self.every_step):
            if self.preparation is None:  # the optimizer's state exists now: the shard has its size
                ckpt = trainer_checkpoint(kwargs["model"], kwargs.get("optimizer"), kwargs.get("lr_scheduler"), state)
                self.preparation = self.manager.prepare_save(ckpt)
            return control
        ckpt = trainer_checkpoint(kwargs["model"], kwargs.get("optimizer"), kwargs.get("lr_scheduler"), state)
        handle = self.manager.save(state.global_step, ckpt)
        if handle.ok:
            self.saved_steps.append(state.global_step)
        control.should_save = False  # saved through ckptd: the Trainer writes no files of its own
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> TrainerControl:
        if self.wait_at_end is not None and self.saved_steps:
            self.manager.wait_until_finished(self.wait_at_end)
        return control


class CkptdResumeMixin:
    """Serve the Trainer's resume path from ckptd (put it before ``Trainer`` in the bases)."""

    #: the ckptd step ``train(resume_from_checkpoint=True)`` resumed from (None: a fresh start)
    ckptd_resumed_from: int | None = None
    _ckptd_rng: dict[str, Any] | None = None
    _ckptd_dir: str | None = None

    def _ckptd_callback(self) -> CkptdCallback:
        for cb in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, CkptdCallback):
                return cb
        raise ValueError("CkptdResumeMixin needs a CkptdCallback among the Trainer's callbacks")

    def ckptd_latest_step(self) -> int | None:
        """ckptd's newest committed step of the job, agreed by every rank; None on a fresh start."""
        manager = self._ckptd_callback().manager
        latest = manager.latest_step()
        group = manager._job_group()
        if group is not None:
            agreed = agree_latest(group, manager.world_size, manager.job, latest)
            return None if agreed < 0 else agreed
        return latest

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``resume_from_checkpoint=True`` resumes from ckptd's newest committed step (a fresh start
        when there is none); a path resumes from the Trainer's own files, as before."""
        if resume_from_checkpoint is True:
            step = self.ckptd_latest_step()
            resume_from_checkpoint = None if step is None else self._ckptd_resume_dir(step)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            if self._ckptd_dir is not None:
                shutil.rmtree(self._ckptd_dir, ignore_errors=True)
                self._ckptd_dir = None

    def _ckptd_resume_dir(self, step: int) -> str:
        manager = self._ckptd_callback().manager
        shard = saved_shard(manager, step)
        try:
            trainer_state = saved_value(shard, "trainer_state")
        except KeyError:
            raise InvalidArgument(f"{manager.job}@{step} holds no trainer state: it was not saved by "
                                  "CkptdCallback") from None
        path = tempfile.mkdtemp(prefix=f"ckptd-resume-{step}-")
        with open(os.path.join(path, TRAINER_STATE_NAME), "w", encoding="utf-8") as f:
            f.write(trainer_state)
        with open(os.path.join(path, RESUME_MARK), "w", encoding="utf-8") as f:
            json.dump({"job": manager.job, "step": step}, f)
        self._ckptd_dir, self.ckptd_resumed_from = path, step
        return path

    def _is_ckptd(self, checkpoint: str | None) -> bool:
        return checkpoint is not None and checkpoint == self._ckptd_dir

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._is_ckptd(resume_from_checkpoint):
            return  # filled in place with the optimizer's state, once both exist
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self._is_ckptd(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        assert self.ckptd_resumed_from is not None
        manager = self._ckptd_callback().manager
        shard = saved_shard(manager, self.ckptd_resumed_from)
        state = build(shard.tree, shard.tensors)
        state["model"] = self.model.state_dict()  # type: ignore[attr-defined]  # filled in place
        manager.restore(state, step=self.ckptd_resumed_from)  # that step or NotFound, never another
        if "optimizer" in state:
            _optimizer(self.optimizer).load_state_dict(state["optimizer"])  # type: ignore[attr-defined]
        if "scheduler" in state:
            self.lr_scheduler.load_state_dict(state["scheduler"])  # type: ignore[attr-defined]
        self._ckptd_rng = state["rng"]

    def _load_scaler(self, checkpoint: str | None) -> None:
        if not self._is_ckptd(checkpoint):
            super()._load_scaler(checkpoint)  # type: ignore[misc]

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if not self._is_ckptd(checkpoint):
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
            return
        if self._ckptd_rng is not None:
            set_rng_states(self._ckptd_rng)


class CkptdTrainer(CkptdResumeMixin, Trainer):
    """``transformers.Trainer`` that resumes from ckptd (``train(resume_from_checkpoint=True)``)."""
