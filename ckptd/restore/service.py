"""The restore entry points: PrepareRestore, the streamed Restore, ReleaseRestore, restore leases.

``RestoreService`` owns the restore leases (``leases``); planning and execution (sources, fallback,
verification) are the ``Restorer``'s (planner.py) and its sources' (sources/), which it is handed
with the catalog, the slot pool, the executor and the lease timeout. The gRPC servicer calls
``prepare_restore``, ``restore_stream`` and ``release_restore``; the daemon's lease reaper calls
``reap_expired``.

Invariants: a restore only reads: it never drops or changes a step (the shards a restarted
trainer left in uncommitted later steps are dropped by its next save, ckptd/save/service.py); a
restored slot stays held while its lease lives and is freed on release unless the catalog holds
it; a streamed restore whose client left before the lease was handed out releases the slot it
filled.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeAlias

from ckptd.core import metrics
from ckptd.core.errors import CkptdError, IntegrityError, NotFound
from ckptd.memory.catalog import Catalog
from ckptd.memory.slots import Slot, SlotPool
from ckptd.restore.planner import Restorer, RestoreResult
from ckptd.restore.sources.base import WHOLE_SHARD, ReadScope
from ckptd.restore.stream import RestoreEvent, RestoreProgress
from ckptd.save.service import check_ids, pid_alive

log = logging.getLogger("ckptd.daemon")  # the daemon's logger: operators filter on it
MAX_VANISHED = 3  # "latest" planned again at most this often when the newest step is removed under it


Retire: TypeAlias = Callable[[str, int, str, int], Awaitable[None]]  # (job, rank, incarnation, restored step)


@dataclass
class RestoreLease:
    lease_id: str
    slot: Slot
    client_pid: int
    deadline_s: float


class RestoreService:
    """The restore RPCs of one daemon and the leases they hand out."""

    def __init__(self, catalog: Catalog, pool: SlotPool, restorer: Restorer, executor: Executor,
                 lease_timeout_s: float, retire: Retire | None = None) -> None:
        self.catalog = catalog
        self.retire = retire  # a writer rolled back: drop its past (SavePath.retire)
        self.pool = pool
        self.restorer = restorer
        self.executor = executor
        self.lease_timeout_s = lease_timeout_s
        self.leases: dict[str, RestoreLease] = {}

    async def prepare_restore(self, job: str, rank: int, world_size: int, step: int | None,
                              dry_run: bool, client_pid: int, strict_latest: bool = False,
                              below_step: int | None = None, retire: str = "",
                              scope: ReadScope = WHOLE_SHARD) -> tuple[RestoreResult, str]:
        check_ids(job, 0 if step is None else step, rank, world_size, retire)
        if dry_run:
            return await self.restorer.plan(job, rank, world_size, step, below_step), ""
        result = await self._restore(job, rank, world_size, step, strict_latest, below_step, None, [], scope)
        await self._retire(job, rank, retire, result.step)
        return result, self._lease_restore(result, client_pid)

    async def _retire(self, job: str, rank: int, incarnation: str, step: int) -> None:
        if incarnation and self.retire is not None:
            await self.retire(job, rank, incarnation, step)

    async def _restore(self, job: str, rank: int, world_size: int, step: int | None, strict_latest: bool,
                       below_step: int | None, progress: RestoreProgress | None,
                       current: list[RestoreResult], scope: ReadScope = WHOLE_SHARD) -> RestoreResult:
        """Plan and execute; for "latest" (unless ``strict_latest``) a step with no valid copy of
        this rank's shard is skipped for the next older one, loudly: the job resumes from the
        newest step it can restore instead of stopping. ``current`` holds the plan being read (a
        plan already made is used first: every plan surveys the sources, peers and store included)."""
        unusable: list[int] = []
        below = below_step
        vanished = 0
        first = current[0] if current else None
        while True:
            planned: int | None = None
            try:
                result = first if first is not None else await self.restorer.plan(job, rank, world_size, step, below)
                first = None
                planned = result.step
                result.unusable = list(unusable)
                current[:] = [result]
                return await self.restorer.execute(job, rank, world_size, result, progress, scope)
            except IntegrityError as exc:
                if step is not None or strict_latest:
                    raise
                if planned is None:  # the plan itself failed (an unreadable manifest): which step was it?
                    planned = await self.restorer.latest_below(job, rank, below)
                unusable.append(planned)
                metrics.RESTORE_FALLBACKS.inc()
                log.error("restore of the latest step of %s rank %d: step %d has no valid copy (%s); "
                          "falling back to an older step", job, rank, planned, exc)
                below = planned
            except NotFound:
                if step is None and planned is not None and vanished < MAX_VANISHED:
                    vanished += 1  # the newest step went while it was read: plan "latest" again
                    continue
                if not unusable:
                    raise
                raise IntegrityError(f"no valid copy of step(s) {unusable} of {job} rank {rank}, and no "
                                     "older committed step") from None

    def _lease_restore(self, result: RestoreResult, client_pid: int) -> str:
        assert result.slot is not None
        lease = RestoreLease(uuid.uuid4().hex, result.slot,
                             client_pid if client_pid > 0 and pid_alive(client_pid) else 0,
                             time.monotonic() + self.lease_timeout_s)
        self.leases[lease.lease_id] = lease
        return lease.lease_id

    async def restore_stream(self, job: str, rank: int, world_size: int, step: int | None, client_pid: int,
                             strict_latest: bool = False, below_step: int | None = None, retire: str = "",
                             scope: ReadScope = WHOLE_SHARD,
                             ) -> AsyncIterator[tuple[RestoreEvent, RestoreResult, str]]:
        """A restore whose progress is streamed (ckptd/restore/stream.py): yields each event with
        the result so far; the last is "done" with the lease id, or an error is raised."""
        check_ids(job, 0 if step is None else step, rank, world_size, retire)
        # plan before streaming: an unknown job or step is an error of the call, not of the stream
        current: list[RestoreResult] = []
        try:
            current.append(await self.restorer.plan(job, rank, world_size, step, below_step))
        except IntegrityError:
            if step is not None or strict_latest:
                raise  # else the restore below falls back to an older step
        progress = RestoreProgress()
        task = asyncio.create_task(
            self._restore(job, rank, world_size, step, strict_latest, below_step, progress, current, scope),
            name=f"restore-{job}-{rank}")

        def finished(t: asyncio.Task[RestoreResult]) -> None:
            if t.cancelled():
                progress.fail(CkptdError("restore cancelled"))
            elif (exc := t.exception()) is not None:
                progress.fail(exc)
            else:
                progress.done()

        task.add_done_callback(finished)
        lease_id = ""
        try:
            while True:
                ev = await progress.queue.get()
                while ev.kind == "ready" and not progress.queue.empty():  # coalesce progress
                    nxt = progress.queue.get_nowait()
                    if nxt.kind != "ready":
                        yield ev, current[0], ""
                    ev = nxt
                if ev.kind == "error":
                    assert ev.error is not None
                    raise ev.error
                if ev.kind == "done":
                    result = await task
                    await self._retire(job, rank, retire, result.step)
                    lease_id = self._lease_restore(result, client_pid)
                    yield ev, result, lease_id
                    return
                yield ev, current[0], ""
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            elif not lease_id and not task.cancelled() and task.exception() is None:
                slot = task.result().slot  # filled, but the client left before it was leased
                if slot is not None:
                    await self._release_restore_slot(slot)

    async def reap_expired(self) -> None:
        """Release the leases whose client died or whose deadline passed."""
        now = time.monotonic()
        for lease in list(self.leases.values()):
            if now > lease.deadline_s or not pid_alive(lease.client_pid):
                await self.release_restore(lease.lease_id)

    async def release_restore(self, lease_id: str) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise NotFound(f"unknown or expired restore lease {lease_id[:16]!r}")
        await self._release_restore_slot(lease.slot)

    async def _release_restore_slot(self, slot: Slot) -> None:
        # A slot nobody adopted (a copy read from a tier) or a memory copy removed meanwhile (ckptctl
        # rm) goes; retired before any await, so no lease takes it while it is destroyed, and
        # destroyed only once every reader (another restore of the same memory copy) let go.
        await self.pool.release_reader(slot, free=slot.content is None and not slot.writing)

