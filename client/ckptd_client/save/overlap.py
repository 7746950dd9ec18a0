"""Overlapped saves: the copy into the slot runs in the background, the save returns at once.

``save(step, state, overlap=True)`` does BeginSave on the calling thread (a lease, a few ms) and
hands the copy to ``OverlapSaver.issue``: one background thread (the copy pool of this manager)
copies the plan into the slot with ``ShardSaver.fill_and_commit``, whose copies are torch
``copy_`` / ``_foreach_copy_`` and ``np.copyto`` calls that release the GIL while they move bytes,
so the training loop's next forward and backward run beside it. The commit (CommitShard) follows
the copy on the same thread. One overlapped save is in flight at a time: the next save, and
``close()``, wait for the previous one.

The state must not change while it is copied. Two protections, both always on:

- The guard (``guard(optimizers)``): a ``register_step_pre_hook`` on each optimizer handed in,
  registered once and kept (a hook with no copy outstanding returns after one attribute test),
  that waits until the outstanding copy is done before ``optimizer.step`` changes the weights.
  ``SaveHandle.wait_copied()`` is the same wait for hand-written loops.
- The version check, for state changed without the guard: the ``_version`` counter of every
  torch leaf (torch bumps it on every in-place op, also under ``no_grad``, and a
  ``state_dict()``'s detached tensors share their parameter's counter) is taken when the save is
  issued and compared once the copy has ended. Any difference refuses the save: the lease is
  aborted (AbortSave), nothing of that step is committed, and the handle's error is
  ``StateChangedDuringCopy`` naming the changed tensors. numpy leaves have no version counter:
  only the guard covers them.

A state holding CUDA tensors is copied device to host on a dedicated CUDA stream of this
manager, made to wait (``wait_stream``, no CPU sync) for the work the training thread had queued
when ``save`` was called, so the copy sees the state as of ``save`` and the next step's kernels on
the default stream run beside it; the copy thread's ``copy_`` returns once its stream has moved
the bytes (into page-locked slots, pinned.py). The guard is a CPU wait for that.

Invariants: a hook waits for the copy only, never for the commit; a copy that failed or was
refused leaves its handle's ``error`` set before the copy counts as done; the pool thread never
touches the collector's state (gcpause is for the calling thread).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import CkptdError
from ckptd_client.save.pinned import holds_cuda
from ckptd_client.save.save_plan import SavePlan
from ckptd_client.save.shard_save import ShardSaver

log = logging.getLogger("ckptd_client")


class StateChangedDuringCopy(CkptdError):
    """A tensor of an overlapped save changed before its copy ended: the save was refused."""


class CopyJob:
    """One overlapped save's copy: done once the bytes are in the slot (or the copy failed)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.copied = threading.Event()
        self.copied_at = 0.0  # perf_counter when the copy (and its version check) ended
        self.error: BaseException | None = None
        self.committed: Future[None] = Future()

    def wait_copied(self, timeout_s: float | None = None) -> bool:
        return self.copied.wait(timeout_s)


def _versions(plan: SavePlan) -> list[tuple[str, Any, int]]:
    return [(leaf.name, leaf.obj, int(leaf.obj._version)) for leaf in plan.leaves if leaf.kind == "t"]


class OverlapSaver:
    """Runs one manager's overlapped copies and guards its optimizers (module docstring)."""

    def __init__(self, saver: ShardSaver) -> None:
        self.saver = saver
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckptd-overlap")
        self.job: CopyJob | None = None  # the newest overlapped save, until its commit ended
        self._guarded: dict[int, tuple[Any, Any]] = {}  # id(optimizer) -> (optimizer, hook handle)
        self.guard_waits_s: deque[float] = deque(maxlen=1024)  # the last guarded steps' waits
        self.guard_wait_total_s = 0.0  # all guarded optimizer steps' waits together
        self._stream: Any = None  # the CUDA copy stream, made on the first CUDA state

    def issue(self, begin: pb.BeginSaveResponse, step: int, plan: SavePlan, client_checksum: bool,
              t0: float, on_error: Callable[[BaseException], None]) -> CopyJob:
        """Start copying plan into begin's slot; the commit follows the copy. ``on_error`` is
        called (on the pool thread, before the copy counts as done) when it fails or is refused."""
        self.drain()
        job = CopyJob(step)
        before = _versions(plan)
        stream = self._cuda_stream(plan)

        def check() -> None:
            changed = [name for name, t, v in before if int(t._version) != v]
            if changed:
                raise StateChangedDuringCopy(
                    f"step {step}: {len(changed)} tensor(s) changed during the overlapped copy "
                    f"(first: {changed[:3]}); the save was refused, nothing of it is committed. "
                    "Guard the optimizer (save(..., optimizers=[opt])) or call handle.wait_copied() "
                    "before changing the state")

        def copied() -> None:
            job.copied_at = time.perf_counter()
            job.copied.set()

        def run() -> None:
            try:
                with contextlib.nullcontext() if stream is None else sys.modules["torch"].cuda.stream(stream):
                    self.saver.fill_and_commit(begin, step, plan, client_checksum, t0, after_copy=check,
                                               on_copied=copied)
            except BaseException as exc:  # noqa: BLE001 - handed to the handle, not lost
                job.error = exc
                on_error(exc)
                job.copied_at = job.copied_at or time.perf_counter()
                job.copied.set()
                job.committed.set_exception(exc)
                return
            job.committed.set_result(None)

        self.job = job
        self._pool.submit(run)
        return job

    def _cuda_stream(self, plan: SavePlan) -> Any:
        """The copy stream, ordered after the training thread's queued work; None for a state
        without CUDA tensors."""
        if not self.saver.pinned.usable()[0] or not holds_cuda(plan.leaves):
            return None
        torch = sys.modules["torch"]
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        return self._stream

    def wait_copied(self, timeout_s: float | None = None) -> bool:
        """Block until the outstanding copy (if any) is in the slot; False past ``timeout_s``."""
        job = self.job
        return job is None or job.wait_copied(timeout_s)

    def drain(self) -> None:
        """Wait until the outstanding overlapped save is copied and committed (or failed)."""
        job = self.job
        if job is not None:
            job.committed.exception()  # waits; the error already went to the handle
            self.job = None

    def guard(self, optimizers: Iterable[Any]) -> None:
        """Make each optimizer's step wait for the outstanding copy (hook registered once, kept)."""
        for opt in optimizers:
            if id(opt) not in self._guarded:
                self._guarded[id(opt)] = (opt, opt.register_step_pre_hook(self._pre_step))

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        job = self.job
        if job is None or job.copied.is_set():
            return
        t = time.perf_counter()
        job.copied.wait()
        waited_s = time.perf_counter() - t
        self.guard_waits_s.append(waited_s)
        self.guard_wait_total_s += waited_s

    def close(self) -> None:
        self.drain()
        for _, hook in self._guarded.values():
            hook.remove()
        self._guarded.clear()
        self._pool.shutdown(wait=True)


__all__ = ["CopyJob", "OverlapSaver", "StateChangedDuringCopy"]
