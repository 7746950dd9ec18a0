"""The restore entry points: PrepareRestore, the streamed Restore, ReleaseRestore, restore leases.

``RestoreService`` owns the restore leases (``leases``); planning and execution (sources, fallback,
verification) are ``Restorer``'s (planner.py) and its sources' (sources/). The daemon's public
``prepare_restore``, ``restore_stream`` and ``release_restore`` call it; the lease reaper
(save/service.py) releases the leases whose client died or whose deadline passed.

Invariants: a restore to step N first drops the partial steps after N that no save lease still
writes (they belong to the job's previous incarnation); a restored slot stays held while its
lease lives and is freed on release unless the catalog holds it; a streamed restore whose client
left before the lease was handed out releases the slot it filled.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptd.core.errors import CkptdError, NotFound
from ckptd.core.types import TierName
from ckptd.memory.catalog import TierState
from ckptd.memory.slots import Slot
from ckptd.restore.planner import RestoreResult
from ckptd.restore.stream import RestoreEvent, RestoreProgress
from ckptd.save.service import check_ids, pid_alive

if TYPE_CHECKING:
    from ckptd.daemon.wiring import Daemon

log = logging.getLogger("ckptd.daemon")  # the daemon's logger: operators filter on it


@dataclass
class RestoreLease:
    lease_id: str
    slot: Slot
    client_pid: int
    deadline_s: float


class RestoreService:
    """The restore RPCs of one daemon and the leases they hand out."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.leases: dict[str, RestoreLease] = {}

    async def prepare_restore(self, job: str, rank: int, world_size: int, step: int | None,
                              dry_run: bool, client_pid: int) -> tuple[RestoreResult, str]:
        check_ids(job, 0 if step is None else step, rank, world_size)
        result = await self.d.restorer.plan(job, rank, world_size, step)
        if dry_run:
            return result, ""
        await self._drop_partial_steps_after(job, result.step, rank)
        result = await self.d.restorer.execute(job, rank, world_size, result)
        return result, self._lease_restore(result, client_pid)

    def _lease_restore(self, result: RestoreResult, client_pid: int) -> str:
        assert result.slot is not None
        lease = RestoreLease(uuid.uuid4().hex, result.slot,
                             client_pid if client_pid > 0 and pid_alive(client_pid) else 0,
                             time.monotonic() + self.d.cfg.memory.lease_timeout_s)
        self.leases[lease.lease_id] = lease
        return lease.lease_id

    async def restore_stream(self, job: str, rank: int, world_size: int, step: int | None,
                             client_pid: int) -> AsyncIterator[tuple[RestoreEvent, RestoreResult, str]]:
        """A restore whose progress is streamed (ckptd/restore/stream.py): yields each event with
        the result so far; the last is "done" with the lease id, or an error is raised."""
        check_ids(job, 0 if step is None else step, rank, world_size)
        result = await self.d.restorer.plan(job, rank, world_size, step)
        await self._drop_partial_steps_after(job, result.step, rank)
        progress = RestoreProgress()
        task = asyncio.create_task(self.d.restorer.execute(job, rank, world_size, result, progress),
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
                        yield ev, result, ""
                    ev = nxt
                if ev.kind == "error":
                    assert ev.error is not None
                    raise ev.error
                if ev.kind == "done":
                    lease_id = self._lease_restore(await task, client_pid)
                    yield ev, result, lease_id
                    return
                yield ev, result, ""
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            elif not lease_id and not task.cancelled() and task.exception() is None:
                slot = task.result().slot  # filled, but the client left before it was leased
                if slot is not None:
                    await self._release_restore_slot(slot)

    async def _drop_partial_steps_after(self, job: str, step: int, rank: int) -> None:
        """A rank restoring ``step`` starts a new incarnation of itself: a later step that never
        completed and holds a shard of that rank belongs to its dead past and must not mix with
        the new run's shards. A partial later step without that rank's shard is in flight by
        the other ranks (their restores drop it if it is theirs from a dead run: every rank of a
        restarted job restores before any of them saves again), and is kept."""
        for st in self.d.catalog.steps(job):
            if st.step <= step or st.in_memory or st.state(TierName.DISK) == TierState.COMMITTED:
                continue
            if rank not in st.shards:
                continue
            if any((lease.job, lease.step) == (job, st.step) for lease in self.d.save_leases.values()):
                continue
            for rec in st.shards.values():
                if rec.slot is not None and rec.slot.content is rec:
                    rec.slot.content = None
                    await asyncio.get_running_loop().run_in_executor(
                        self.d.executor, rec.slot.meta_path.unlink, True)
            log.info("dropping partial step %s@%d (%d of %d shards) left by an earlier run",
                     job, st.step, len(st.shards), st.world_size)
            self.d.catalog.forget(job, st.step)
        await self.d.pool.notify()

    async def release_restore(self, lease_id: str) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise NotFound(f"unknown or expired restore lease {lease_id[:16]!r}")
        await self._release_restore_slot(lease.slot)

    async def _release_restore_slot(self, slot: Slot) -> None:
        await self.d.pool.release_reader(slot)
        if slot.content is None and slot.readers == 0:
            await self.d.pool.free(slot)

