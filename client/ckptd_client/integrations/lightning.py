"""PyTorch Lightning on ckptd: a ``CheckpointIO`` plugin.

    ckpt_io = CkptdCheckpointIO(CheckpointManager("my-job"))
    trainer = pl.Trainer(..., plugins=[ckpt_io], callbacks=[ModelCheckpoint(every_n_epochs=1, save_top_k=-1)])
    trainer.fit(model, ckpt_path=ckpt_io.resume_path())   # ckptd's newest step, or None: a fresh start

``save_checkpoint`` hands Lightning's checkpoint dict (model ``state_dict``, optimizer and
scheduler states, loops, callbacks, hyper-parameters) to ``CheckpointManager.save`` as step
``checkpoint["global_step"]``, plus the host RNG states under ``"ckptd_rng"`` (Lightning does not
save them; a resumed epoch's shuffle and dropout depend on them). It returns once the bytes are
in the daemon's shared memory: the daemon writes them to its tiers in the background, so this
plugin is asynchronous by itself (no ``AsyncCheckpointIO`` thread or second copy needed).
The ``path`` Lightning chooses is only recorded (``paths``); nothing is written there.

``load_checkpoint("ckptd://JOB/STEP")`` (``resume_path()`` gives the newest committed step,
agreed by every rank under torch.distributed) restores exactly that step: the state handed to
``restore`` is built from the step's manifest (``saved.saved_template``), so no key is added or
dropped under a strict or lenient restore. The RNG states are set right there (before the
resumed epoch draws its shuffle) and the dict goes back to Lightning, which restores the rest.
``remove_checkpoint`` keeps the step: ckptd's retention removes steps, not Lightning's top-k.
Lightning calls ``save_checkpoint`` on global rank 0 only, so the manager is rank 0's
(``world_size=1`` in a multi-process job).

``CkptdPrepareSave(ckpt_io)``, a callback, has the first save's slots made and mapped ahead
(``CheckpointManager.prepare_save``), so that save copies at steady speed: at the end of the
first training batch after an optimizer step (torch optimizers make their state at their first
step), on global rank 0, it prepares for what a save will hold, built from public state alone:
the module's ``state_dict``, each optimizer's and scheduler's ``state_dict``, each callback's
``state_dict`` and the RNG states the plugin adds. Lightning's own checkpoint dict is not built
for it: that would run the user's ``on_save_checkpoint`` hooks at a step that does not save.
What those hooks add (and the loops' counters) is left out: a save larger than the slots
prepared takes the cold path, as without the callback.
"""

from __future__ import annotations

import re
from typing import Any

from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from pytorch_lightning.callbacks import Callback

from ckptd.core.errors import InvalidArgument
from ckptd.core.types import Level
from ckptd_client.agreement import agree_latest
from ckptd_client.integrations.rng import rng_states, set_rng_states
from ckptd_client.integrations.saved import saved_template
from ckptd_client.manager import CheckpointManager
from ckptd_client.save.prep import SavePreparation

SCHEME = "ckptd://"
RNG_KEY = "ckptd_rng"
_PATH_RE = re.compile(r"ckptd://(?P<job>[^/]+)/(?P<step>\d+|latest)")


class CkptdCheckpointIO(CheckpointIO):
    """Lightning's checkpoint IO through ckptd (see module docstring)."""

    def __init__(self, manager: CheckpointManager, *, save_rng: bool = True,
                 wait_at_teardown: Level | None = Level.LOCAL_DURABLE) -> None:
        self.manager = manager
        self.save_rng = save_rng
        self.wait_at_teardown = wait_at_teardown
        #: Lightning's path of each save -> the ckptd step it was saved as
        self.paths: dict[str, int] = {}
        self.resumed_from: int | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        step = int(checkpoint["global_step"])
        state = dict(checkpoint)
        if self.save_rng:
            state[RNG_KEY] = rng_states()
        handle = self.manager.save(step, state)
        if handle.ok:
            self.paths[str(path)] = step

    def resume_path(self) -> str | None:
        """``ckptd://JOB/STEP`` of the newest committed step (agreed by every rank), or None."""
        latest = self.manager.latest_step()
        group = self.manager._job_group()
        if group is not None:
            agreed = agree_latest(group, self.manager.world_size, self.manager.job, latest)
            latest = None if agreed < 0 else agreed
        return None if latest is None else f"{SCHEME}{self.manager.job}/{latest}"

    def _step_of(self, path: Any) -> int:
        text = str(path)
        if text in self.paths:
            return self.paths[text]
        m = _PATH_RE.fullmatch(text)
        if m is None or m["job"] != self.manager.job:
            raise InvalidArgument(f"{text!r} is not a checkpoint of ckptd job {self.manager.job!r} "
                                  f"(use {SCHEME}{self.manager.job}/STEP or resume_path())")
        if m["step"] == "latest":
            latest = self.manager.latest_step()
            if latest is None:
                raise InvalidArgument(f"job {self.manager.job!r} has no committed step to resume from")
            return latest
        return int(m["step"])

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        step = self._step_of(path)
        state = saved_template(self.manager, step)
        self.manager.restore(state, step=step)  # that step or NotFound, never another
        self.resumed_from = step
        rng = state.pop(RNG_KEY, None)
        if rng is not None:
            set_rng_states(rng)
        if not isinstance(state, dict):
            raise InvalidArgument(f"{self.manager.job}@{step} is not a Lightning checkpoint")
        return state

    def remove_checkpoint(self, path: Any) -> None:
        self.paths.pop(str(path), None)  # the step stays: ckptd's retention decides what goes

    def teardown(self) -> None:
        if self.wait_at_teardown is not None and self.paths:
            self.manager.wait_until_finished(self.wait_at_teardown)


class CkptdPrepareSave(Callback):
    """Prepare the slots of ``checkpoint_io``'s first save after the first optimizer step (module docstring)."""

    def __init__(self, checkpoint_io: CkptdCheckpointIO) -> None:
        self.checkpoint_io = checkpoint_io
        self.preparation: SavePreparation | None = None  # once started: its progress and error

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.preparation is not None or trainer.global_step < 1 or not trainer.is_global_zero:
            return
        self.preparation = self.checkpoint_io.manager.prepare_save(self.expected_state(trainer, pl_module))

    def expected_state(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """What a save will hold, from public state alone: no hook of the user's runs."""
        state: dict[str, Any] = {
            "state_dict": pl_module.state_dict(),
            "optimizer_states": [opt.state_dict() for opt in trainer.optimizers],
            "lr_schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "callbacks": {str(cb.state_key): cb.state_dict() for cb in trainer.callbacks},
        }
        if self.checkpoint_io.save_rng:
            state[RNG_KEY] = rng_states()
        return state
