"""ManagerBase: the training-side API of ckptd for plain tensors (``CheckpointManager`` adds DTensors).

``save`` copies the state into a daemon-owned shm slot (``overlap=True``: returns once the copy
is issued, save/overlap.py; ``prepare_save``: its slots made and mapped ahead, save/prep.py) and
commits; ``restore`` fills it in place from the nearest valid tier. Blocking gRPC, no event
loop; a slot the daemon prepared for this rank's restore is mapped ahead (restore/premap.py); never
imports boto3 or the daemon's tiers. The DCP plugin builds on this class.

A save that cannot be taken (daemon down, no room in the byte budget under the skip policy, a
timeout) does not raise by default: the handle records the error, a warning is logged, and
training goes on (``on_error="raise"`` changes that).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from typing import Any

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import BudgetExhausted, CkptdError, FailedPrecondition, NotFound, TierFailed
from ckptd.core.layout_memo import LayoutMemo
from ckptd.core.types import Level, validate_job, validate_step
from ckptd_client.agreement import agree_latest, restore_agreed
from ckptd_client.handles import RestoreInfo, SaveHandle
from ckptd_client.ranks import default_node_ranks, default_rank, join_peers
from ckptd_client.restore.premap import RestorePremap
from ckptd_client.restore.stream import restore_streamed
from ckptd_client.restore.strict import Strictness
from ckptd_client.rpc import Connection
from ckptd_client.save.overlap import OverlapSaver
from ckptd_client.save.prep import SavePreparation
from ckptd_client.save.shard_save import ShardSaver
from ckptd_client.tree import HoldsDTensor, holds_dtensor

log = logging.getLogger("ckptd_client")

class ManagerBase:
    """Save and restore one job's sharded state through the node's ckptd daemon."""

    def __init__(
        self,
        job: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        addr: str | os.PathLike[str] | None = None,
        save_interval_steps: int = 1,
        backpressure: str | None = None,
        wait_timeout_s: float | None = None,
        checksum: str = "daemon",
        on_error: str = "warn",
        connect_timeout_s: float = 10.0,
        node_ranks: list[int] | tuple[int, ...] | None = None,
        gather_peers: bool = True,
        premap_restore: bool = True,
        allow_new_world_size: bool = False,
    ) -> None:
        validate_job(job)
        if rank is None or world_size is None:
            r, w = default_rank()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not (1 <= world_size and 0 <= rank < world_size):
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if save_interval_steps < 1:
            raise ValueError("save_interval_steps must be >= 1")
        if backpressure not in (None, "wait", "skip"):
            raise ValueError("backpressure must be 'wait', 'skip' or None (the daemon's default)")
        if checksum not in ("daemon", "client"):
            raise ValueError("checksum must be 'daemon' or 'client'")
        if on_error not in ("warn", "raise"):
            raise ValueError("on_error must be 'warn' or 'raise'")
        self.job = job
        self.rank = rank
        self.world_size = world_size
        # ranks served by this node's daemon; () means every rank (a one-node job)
        self.node_ranks = tuple(node_ranks) if node_ranks is not None else default_node_ranks(rank, world_size)
        if self.node_ranks and rank not in self.node_ranks:
            raise ValueError(f"rank {rank} is not among node_ranks {list(self.node_ranks)}")
        self.save_interval_steps = save_interval_steps
        self.backpressure = backpressure
        self.wait_timeout_s = wait_timeout_s
        self.checksum = checksum
        self.on_error = on_error
        #: saves may name a world size other than the job's committed steps (a job resumed on another
        #: number of ranks, docs/dcp.md); without it the daemon refuses them (FailedPrecondition)
        self.allow_new_world_size = allow_new_world_size
        self.addr = None if addr is None else str(addr)
        self.conn = Connection(addr)
        self.conn.wait_ready(connect_timeout_s)
        self._layouts = LayoutMemo()  # layouts converted once per state shape (saves and restores)
        self._saver = ShardSaver(self.conn, job, rank, world_size, self._layouts)  # plans, slots, warmer
        self._maps = self._saver.maps
        self._overlap = OverlapSaver(self._saver)
        self.handles: list[SaveHandle] = []
        #: this writer's incarnation: drawn anew by every restore (the state rolled back), so the
        #: daemon drops what an earlier incarnation of this rank left in uncommitted later steps
        self.incarnation = uuid.uuid4().hex
        self.resumed_from: int | None = None  # the step the last restore() resumed from; -1: none found
        self._saved_as = ""  # the incarnation of this manager's saves so far ("": none yet)
        self._retire = ""  # the incarnation a restore under way rolls back
        self.stalls_s: list[float] = []
        self.last_restore: RestoreInfo | None = None
        self.peer_members = self._join_peers() if gather_peers else []
        # a slot the daemon prepared for this rank's restore, mapped while the trainer starts
        self._premap = RestorePremap(self.conn, job, rank) if premap_restore else None

    # -- save -------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    def save(self, step: int, state: Any, *, overlap: bool = False, optimizers: tuple[Any, ...] = ()) -> SaveHandle:
        """Stage this rank's state for ``step``; returns once the bytes are in the daemon's slot,
        or with ``overlap`` once their copy is issued: ``optimizers`` then wait for it before
        stepping, and a state changed during it refuses the save (overlap.py)."""
        validate_step(step)
        t0 = time.perf_counter()
        self._overlap.drain()  # one overlapped save in flight
        self._overlap.guard(optimizers)
        self._drop_premap()  # a job that saves first restored nothing: the prepared slot goes to saves
        try:
            plan = self._saver.plan(state)  # TypeError for unsupported values
        except HoldsDTensor:  # DTensors: planned by DCP, saved through the same path (dcp/route.py)
            return self._save_dtensors(step, state)
        nbytes = plan.nbytes
        policy = {None: pb.BACKPRESSURE_DEFAULT, "wait": pb.BACKPRESSURE_WAIT,
                  "skip": pb.BACKPRESSURE_SKIP}[self.backpressure]
        self._saved_as = self.incarnation
        handle = SaveHandle(self, step, nbytes=nbytes)
        try:
            begin = self.conn.call(self.conn.stub.BeginSave, pb.BeginSaveRequest(
                job=self.job, step=step, rank=self.rank, world_size=self.world_size, nbytes=nbytes,
                policy=policy, client_pid=os.getpid(), node_ranks=list(self.node_ranks), incarnation=self.incarnation,
                resumed=self.resumed_from is not None,
                resumed_from=-1 if self.resumed_from is None else self.resumed_from,
                wait_timeout_ms=int(self.wait_timeout_s * 1000) if self.wait_timeout_s else 0,
                new_world_size=self.allow_new_world_size,
            ), timeout_s=(self.wait_timeout_s or 0) + 120)
            handle.waited_s = time.perf_counter() - t0
            if overlap:
                handle.copy = self._overlap.issue(begin, step, plan, self.checksum == "client", t0,
                                                  lambda exc: self._copy_failed(handle, exc))
            else:
                self._saver.fill_and_commit(begin, step, plan, self.checksum == "client", t0)
        except BudgetExhausted as exc:
            handle.skipped, handle.error = True, exc
            log.warning("ckptd: save of %s@%d skipped: %s", self.job, step, exc)
            if self.on_error == "raise":
                raise
        except CkptdError as exc:
            handle.error = exc
            log.warning("ckptd: save of %s@%d failed: %s", self.job, step, exc)
            if self.on_error == "raise":
                raise
        handle.stall_s = time.perf_counter() - t0
        if handle.ok:
            self.stalls_s.append(handle.stall_s)
        self.handles.append(handle)
        del self.handles[:-64]
        return handle

    def prepare_save(self, state: Any, *, slots: int = 0) -> SavePreparation:
        """Have the slots saves of ``state`` use made and mapped in the background, so the first save copies
        at steady speed; returns at once, idempotent; ``wait()`` raises its error (save/prep.py)."""
        self._overlap.drain()  # as save(): the planner's layout must not change under a copy in flight
        return self._saver.prepare(state, slots)

    def _copy_failed(self, handle: SaveHandle, exc: BaseException) -> None:
        handle.error = exc if isinstance(exc, CkptdError) else CkptdError(f"overlapped copy failed: {exc!r}")
        log.warning("ckptd: overlapped save of %s@%d failed: %s", self.job, handle.step, exc)

    def _wait(self, step: int, level: Level, timeout_s: float | None) -> pb.StepStatus:
        timeout_s = 3600.0 if timeout_s is None else timeout_s
        return self.conn.call(self.conn.stub.WaitStep, pb.WaitStepRequest(
            job=self.job, step=step, level=int(level), timeout_ms=max(1, int(timeout_s * 1000)),  # type: ignore[arg-type]
        ), timeout_s=timeout_s + 10)

    def wait_until_finished(self, level: Level = Level.LOCAL_DURABLE, timeout_s: float | None = None) -> int | None:
        """Wait until the newest successful save reached ``level``; return its step.

        A step the tier skipped on purpose (superseded, interval) is not an error; a failed tier is.
        Errors follow the manager's ``on_error`` policy, as ``save()`` does: under "warn" (the
        default) a failure (daemon unavailable, tier failed, timeout) is logged and None returned;
        under "raise" it is raised.
        """
        try:
            return self._wait_newest(level, timeout_s)
        except CkptdError as exc:
            if self.on_error == "raise":
                raise
            log.warning("ckptd: wait for the newest save of %s to reach %s failed: %s", self.job, level.name, exc)
            return None

    def _wait_newest(self, level: Level, timeout_s: float | None) -> int | None:
        for handle in reversed(self.handles):
            if not handle.ok:
                continue
            try:
                handle.wait(level, timeout_s)
            except TierFailed as exc:
                if "skipped" not in str(exc):
                    raise
            except FailedPrecondition:  # the daemon does not run that tier: STAGED is the top
                handle.wait(Level.STAGED, timeout_s)
            return handle.step
        return None

    @property
    def guard_wait_s(self) -> float:
        """Seconds guarded optimizer steps waited for overlapped copies, all together (overlap.py)."""
        return self._overlap.guard_wait_total_s

    def stall_median_s(self) -> float | None:
        return statistics.median(self.stalls_s) if self.stalls_s else None

    # -- queries ----------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps committed at some tier, ascending."""
        try:
            resp = self.conn.call(self.conn.stub.ListSteps, pb.ListStepsRequest(job=self.job))
        except NotFound:
            return []
        return [s.step for s in resp.steps if s.committed]

    def latest_step(self, below: int | None = None) -> int | None:
        """Newest step committed at any tier the daemon can reach (older than ``below`` if
        given), or None."""
        try:
            resp = self.conn.call(self.conn.stub.PrepareRestore, pb.PrepareRestoreRequest(
                job=self.job, rank=self.rank, world_size=self.world_size, step=-1, dry_run=True,
                below_step=below or 0))
        except NotFound:
            return None
        return int(resp.step)

    # -- restore ----------------------------------------------------------------------------
    def restore(self, state: Any, step: int | str = "latest", strict_latest: bool = False, *,
                strict: bool = True, convert_dtype: bool = False) -> int | None:
        """Fill ``state`` in place from a committed step; return the step, or None if none exists.

        Strict by default (restore/strict.py): missing or extra keys, or a tensor of another shape or dtype
        raise StateMismatchError naming them before anything is copied; tensors are filled in place.
        ``convert_dtype=True`` casts dtypes; ``strict=False`` is the lenient restore. A state holding
        DTensors is loaded through DCP (dcp/route.py), resharded to the current mesh.

        ``step="latest"`` with no checkpoint returns None (a fresh start); an explicit step that
        does not exist raises NotFound. With a torch.distributed process group of this job's
        world size, "latest" is agreed by every rank first (ckptd_client/agreement.py), so ranks
        never resume from different steps. When no valid copy of the newest step is left (every
        copy of some rank's shard is corrupt or gone), "latest" falls back to the newest older
        step that restores on every rank, with an error logged and the skipped steps in
        ``last_restore.unusable_steps``; ``strict_latest=True`` raises IntegrityError instead.
        """
        t0 = time.perf_counter()
        self._retire, self._saved_as = self._saved_as, ""  # this writer's past, dropped by the daemon
        self.incarnation = uuid.uuid4().hex  # the state rolls back: later saves start a new past
        strictness = Strictness(strict, convert_dtype)
        if holds_dtensor(state):
            got = self._restore_dtensors(state, step, strictness)
        else:
            got = self._restore(state, step, strict_latest, t0, strictness)
        self.resumed_from = -1 if got is None else got  # saves from now on belong to the resumed run
        return got

    def _restore(self, state: Any, step: int | str, strict_latest: bool, t0: float,
                 strictness: Strictness) -> int | None:
        if step != "latest":
            return self._restore_step(state, validate_step(int(step)), False, t0, strictness)
        dist = self._job_group()
        if dist is None:  # no process group: the daemon picks (and falls back) for this rank alone
            got = self._restore_step(state, -1, strict_latest, t0, strictness)
            if got is not None and self.last_restore is not None and self.last_restore.unusable_steps:
                log.error("ckptd: %s rank %d: no valid copy of step(s) %s; resumed from step %d",
                          self.job, self.rank, self.last_restore.unusable_steps, got)
            return got
        agreed = agree_latest(dist, self.world_size, self.job, self.latest_step())
        if agreed < 0:
            return None
        got, unusable = restore_agreed(dist, self.world_size, self.job, agreed, strict_latest,
                                       lambda step: self._restore_step(state, step, False, t0, strictness),
                                       lambda below: self.latest_step(below=below))
        if self.last_restore is not None:
            self.last_restore.unusable_steps = unusable
        return got

    def _restore_step(self, state: Any, req_step: int, strict_latest: bool, t0: float, strictness: Strictness,
                      ) -> int | None:
        request = pb.PrepareRestoreRequest(job=self.job, rank=self.rank, world_size=self.world_size, step=req_step,
                                           client_pid=os.getpid(), strict_latest=strict_latest,
                                           retire_incarnation=self._retire)
        try:
            start, done = restore_streamed(self.conn, request, state, 600, self._premap, strictness, self._layouts,
                                           self._maps.borrow)
        except NotFound:
            if req_step < 0:
                return None
            raise
        finally:
            self._drop_premap()
        self.last_restore = RestoreInfo(int(done.step), done.served_from, time.perf_counter() - t0,
                                        done.read_s, list(done.rejected), [int(s) for s in done.unusable_steps])
        return int(done.step)

    def _job_group(self) -> Any:
        """torch.distributed when an initialized process group spans this job, else None."""
        import sys

        dist = sys.modules.get("torch.distributed")
        if self.world_size < 2 or dist is None or not dist.is_available() or not dist.is_initialized() \
                or dist.get_world_size() != self.world_size:
            return None
        return dist

    def _join_peers(self) -> list[str]:
        """Membership from the job (ranks.join_peers); collective: every rank constructs its manager."""
        dist = self._job_group()
        return [] if dist is None else join_peers(self.conn, dist, self.world_size)

    def warm_restore(self, timeout_s: float = 30.0) -> bool:
        """Wait until the slot the daemon prepared for this rank's restore is mapped here
        (optional: ``restore`` uses it if ready); False when there is none (restore/premap.py)."""
        return self._premap is not None and self._premap.wait(timeout_s)

    def _drop_premap(self) -> None:
        if self._premap is not None:
            self._premap.close()
        self._premap = None

    def _save_dtensors(self, step: int, state: Any) -> SaveHandle:  # CheckpointManager: through DCP
        raise TypeError("a state holding DTensors needs ckptd_client.CheckpointManager (it goes through DCP)")

    def _restore_dtensors(self, state: Any, step: int | str, strictness: Strictness) -> int | None:
        raise TypeError("a state holding DTensors needs ckptd_client.CheckpointManager (it goes through DCP)")

    def close(self) -> None:
        self._overlap.close()
        self._drop_premap()
        self._saver.close()
        self.conn.close()

    def __enter__(self) -> ManagerBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
