"""The checkpointing methods ``bench/goodput.py`` compares, one table entry each.

A method is a class built in the training child with a ``Ctx`` and the ``Trainer``; the loop
calls ``before_update()`` (before ``optimizer.step`` changes the state: where a method copying in
the background waits for that copy) and ``after_update(step)`` (a save of the new state), and
``finish()`` once after the timed steps (waits for what is still in flight, returns the steps
that reached local disk). ``METHODS`` maps each name to a ``Spec``: the class, whether the parent
starts a ckptd daemon for it, and whether it runs in the DLRover interpreter. Adding a method is
one class and one entry.

- ``none``: no checkpointing (the baseline).
- ``ckptd_sync``: ``CheckpointManager.save`` every step, against a ``ckptd serve`` whose disk
  tier drains every step it can (the daemon's log says which steps reached LOCAL_DURABLE).
- ``ckptd_overlap``: ``CheckpointManager.save(step, state, overlap=True, optimizers=(adamw,))``
  every step against the same daemon: the save returns once the copy is issued, the copy runs
  beside the next forward and backward, and the guard hook on AdamW waits for it before the next
  ``optimizer.step`` (that wait counts as blocked time).
- ``dcp_async``: ``torch.distributed.checkpoint.async_save`` every step in its strongest CPU
  configuration: one persistent ``DefaultStager`` with ``use_async_staging=True`` (and pinned
  and shared memory asked for; torch ignores pinning without an accelerator), the staging
  overlapped with the next step's forward and backward and waited for before its optimizer step;
  one save in flight (the previous upload is awaited before the next save); a save's files are
  removed once the next one is durable.
- ``dlrover``: DLRover Flash Checkpoint, ``DdpCheckpointer.save_checkpoint(..., StorageType.MEMORY)``
  standalone (it forks its own saver); memory only, so no save reaches disk.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _goodput_train import Trainer


@dataclass(frozen=True)
class Ctx:
    workdir: Path
    socket: str  # the ckptd daemon's socket ("" when the method needs none)
    warmup: int  # steps 1..warmup are untimed


class NoSave:
    def __init__(self, ctx: Ctx, t: Trainer) -> None:
        pass

    def before_update(self) -> None:
        pass

    def after_update(self, step: int) -> None:
        pass

    def finish(self) -> list[int]:
        return []

    def guard_wait_s(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


class CkptdSync(NoSave):
    def __init__(self, ctx: Ctx, t: Trainer) -> None:
        from ckptd_client import CheckpointManager

        self.t = t
        self.mgr = CheckpointManager("goodput", rank=0, world_size=1, addr=ctx.socket, on_error="raise")

    def after_update(self, step: int) -> None:
        self.mgr.save(step, self.t.state())

    def finish(self) -> list[int]:
        from ckptd_client import Level

        self.mgr.wait_until_finished(Level.LOCAL_DURABLE, timeout_s=600)
        return []  # the parent reads the durable steps from the daemon's log

    def close(self) -> None:
        self.mgr.close()


class CkptdOverlap(CkptdSync):
    def __init__(self, ctx: Ctx, t: Trainer) -> None:
        super().__init__(ctx, t)
        self.seen = 0.0
        self.handles: list[Any] = []

    def after_update(self, step: int) -> None:
        self.handles.append(self.mgr.save(step, self.t.state(), overlap=True, optimizers=(self.t.optimizer,)))

    def guard_wait_s(self) -> float:
        total = self.mgr.guard_wait_s
        new, self.seen = total - self.seen, total
        return new

    def finish(self) -> list[int]:
        if self.handles:
            self.handles[-1].wait_copied()
        failed = [h for h in self.handles if h.copy is not None and h.copy.committed.exception() is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} overlapped save(s) failed: {failed[0].error}")
        return super().finish()


class DcpAsync(NoSave):
    def __init__(self, ctx: Ctx, t: Trainer) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.t, self.ctx = t, ctx
        dist.init_process_group("gloo", init_method=f"file://{ctx.workdir / 'dcp-pg-init'}", rank=0, world_size=1)
        self.stager = DefaultStager(StagingOptions(
            use_pinned_memory=True, use_shared_memory=True, use_async_staging=True,
            use_non_blocking_copy=torch.accelerator.is_available()))
        self.staging: Any = None
        self.upload: Any = None
        self.upload_step = 0
        self.durable: list[int] = []
        self.kept: Path | None = None

    def before_update(self) -> None:
        if self.staging is not None:
            self.staging.result()  # the state may change only once it is staged
            self.staging = None

    def _await_upload(self) -> None:
        if self.upload is None:
            return
        self.upload.result()
        done = self.ctx.workdir / "dcp" / f"step-{self.upload_step}"
        self.durable.append(self.upload_step)
        if self.kept is not None:
            shutil.rmtree(self.kept, ignore_errors=True)
        self.kept, self.upload = done, None

    def after_update(self, step: int) -> None:
        from torch.distributed.checkpoint.state_dict_saver import async_save

        self._await_upload()
        resp: Any = async_save(self.t.state_dict(), checkpoint_id=str(self.ctx.workdir / "dcp" / f"step-{step}"),
                               async_stager=self.stager)
        self.staging = getattr(resp, "staging_completion", None)
        self.upload = getattr(resp, "upload_completion", resp)
        self.upload_step = step

    def finish(self) -> list[int]:
        self.before_update()
        self._await_upload()
        return self.durable

    def close(self) -> None:
        import torch.distributed as dist

        self.stager.close()
        dist.destroy_process_group()


class Dlrover(NoSave):
    def __init__(self, ctx: Ctx, t: Trainer) -> None:
        from dlrover.trainer.torch.flash_checkpoint.checkpointer import StorageType  # type: ignore[import-untyped]
        from dlrover.trainer.torch.flash_checkpoint.ddp import DdpCheckpointer  # type: ignore[import-untyped]

        self.t, self.memory = t, StorageType.MEMORY
        self.ckpt = DdpCheckpointer(str(ctx.workdir / "dlrover"))
        self.skipped = 0

    def after_update(self, step: int) -> None:
        self.ckpt.save_checkpoint(step, self.t.state_dict(), storage_type=self.memory)
        if getattr(self.ckpt._engine, "_cached_step", step) != step:
            self.skipped += 1  # its shm lock was busy: DLRover skipped the copy

    def finish(self) -> list[int]:
        time.sleep(0)  # memory only: nothing reaches disk
        return []

    def close(self) -> None:
        try:
            self.ckpt._engine.close()
        except Exception:  # noqa: BLE001, S110 - best effort: the parent removes its shm files
            pass


@dataclass(frozen=True)
class Spec:
    cls: type[NoSave]
    daemon: bool = False  # the parent starts a ckptd daemon for it
    dlrover: bool = False  # runs in the interpreter that has DLRover


METHODS: dict[str, Spec] = {
    "none": Spec(NoSave),
    "ckptd_sync": Spec(CkptdSync, daemon=True),
    "ckptd_overlap": Spec(CkptdOverlap, daemon=True),
    "dcp_async": Spec(DcpAsync),
    "dlrover": Spec(Dlrover, dlrover=True),
}
