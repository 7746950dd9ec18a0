"""The background drain: memory -> disk, one step at a time per daemon, newest first.

The drainer owns one task, started with the daemon and awaited on shutdown. It takes, per job,
the newest step staged in memory that the disk tier has not handled (its shard files are
written while the daemon still checksums the slots; the manifest waits for the checksums); older pending steps are
marked SKIPPED (superseded) so a disk slower than the save rate never builds a queue, and so is a
step whose slots newer saves reused before the drain got to it (the catalog lets a slot go once a
newer step is committed in memory). While a step
drains its slots are held for reading (readers), so they cannot be reused under the writer. Disk writes run
in the daemon's I/O thread pool. After a commit, disk retention runs; it never deletes the newest
committed step. A failed write marks the step FAILED at the disk tier and is reported; the memory
copy stays, so nothing acknowledged is lost. With peers, a step's files are written once this node's
push of it ended, or after ``peers.drain_wait_s`` at most (``before_write``: replication first).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from ckptd.core import metrics
from ckptd.core.config import DiskSection
from ckptd.core.errors import AlreadyExists, CkptdError
from ckptd.core.types import Level, TierName
from ckptd.drains.retainer import apply_retention
from ckptd.drains.worker import Worker
from ckptd.memory.catalog import Catalog, StepState, TierState
from ckptd.memory.slots import SlotPool
from ckptd.tiers.disk import DiskTier

log = logging.getLogger("ckptd.pipeline")

CHECKSUM_WAIT_S = 600.0  # a step's slots are checksummed long before this


class DiskDrainer(Worker):
    """Owner of the memory -> disk drain task."""

    name = "disk-drainer"

    def __init__(
        self,
        catalog: Catalog,
        pool: SlotPool,
        tier: DiskTier | None,
        cfg: DiskSection,
        executor: Executor,
        *,
        in_upload: dict[str, set[int]] | None = None,
        operator_pins: dict[str, set[int]] | None = None,
        on_commit: Callable[[], None] | None = None,
        across_nodes: Callable[[StepState, bool, str], None] | None = None,
        before_write: Callable[[StepState], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self.catalog = catalog
        self.pool = pool
        self.tier = tier
        self.cfg = cfg
        self.executor = executor
        self.last_drain: dict[str, Any] = {}
        #: steps being uploaded from their disk copy (the uploader adds them): retention keeps them
        self.in_use: dict[str, set[int]] = {} if in_upload is None else in_upload
        #: ckptctl pin (the daemon's PinStore.pins): retention keeps them
        self.operator_pins: dict[str, set[int]] = {} if operator_pins is None else operator_pins
        self.on_commit = on_commit  # e.g. wake the object uploader
        #: multi-node steps with peers: (step, this node's part committed?, why not) is handed
        #: on for the cross-node commit of LOCAL_DURABLE (Membership.disk_across_nodes)
        self.across_nodes = across_nodes
        #: awaited before a step's shard files are written (Membership.before_drain: replication first)
        self.before_write = before_write

    async def _run(self) -> None:
        while True:
            await self._wait_kick()
            while (st := await self._next()) is not None:
                await self._drain(st)
            if self._stopping:
                return

    async def _next(self) -> StepState | None:
        """Newest pending in-memory step of any job; supersede older pending ones."""
        best: StepState | None = None
        for job in list(self.catalog.jobs):
            steps = self.catalog.steps(job)
            await self.catalog.supersede_reused(steps, TierName.DISK)
            pending = [s for s in steps if s.staged_in_slots and s.state(TierName.DISK) == TierState.PENDING]
            if not pending:
                continue
            newest = pending[-1]
            for old in pending[:-1]:
                await self.catalog.set_tier(
                    old, TierName.DISK, TierState.SKIPPED, f"superseded by step {newest.step}"
                )
            if self.tier is None:
                await self.catalog.set_tier(newest, TierName.DISK, TierState.SKIPPED, "disk tier off")
                continue
            if newest.step % self.cfg.every_n_steps:
                await self.catalog.set_tier(
                    newest, TierName.DISK, TierState.SKIPPED,
                    f"not a multiple of disk.every_n_steps={self.cfg.every_n_steps}",
                )
                continue
            if best is None or newest.created_unix_s < best.created_unix_s:
                best = newest
        return best

    async def _drain(self, st: StepState) -> None:
        assert self.tier is not None
        tier = self.tier
        records = [st.shards[r] for r in sorted(st.shards)]
        slots = [r.slot for r in records]
        if any(slot is None or slot.content is not rec for rec, slot in zip(records, slots)):
            # a newer step's save took a slot of this superseded one before the drain got to it
            await self.catalog.set_tier(st, TierName.DISK, TierState.SKIPPED, "superseded: memory copy reused")
            return
        for slot in slots:
            assert slot is not None
            self.pool.hold(slot)
        if self.before_write is not None:
            await self.before_write(st)
        await self.catalog.set_tier(st, TierName.DISK, TierState.IN_PROGRESS)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            # The shard files are written while the daemon may still be checksumming the slots
            # (the two passes overlap); the manifest, which records the checksums, waits for them.
            await asyncio.gather(*(
                loop.run_in_executor(
                    self.executor, tier.put_shard, st.job, st.step, rec.entry,
                    slot.view(rec.entry.nbytes),  # type: ignore[union-attr]
                )
                for rec, slot in zip(records, slots)
            ))
            try:
                await self.catalog.wait_level(st.job, st.step, Level.STAGED, CHECKSUM_WAIT_S)
            except CkptdError as exc:
                # a shard failed its checksum: the step is not staged any more; drop the files and
                # go back to waiting, so an honest retry of the same step drains normally
                await loop.run_in_executor(self.executor, tier.delete, st.job, st.step)
                await self.catalog.set_tier(st, TierName.DISK, TierState.PENDING, f"drain abandoned: {exc}")
                return
            await loop.run_in_executor(self.executor, tier.commit, st.manifest())
        except AlreadyExists as exc:
            self._node_part_done(st, True, "")
            await self.catalog.set_tier(st, TierName.DISK, TierState.COMMITTED, str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure degrades the level, never crashes
            log.error("disk drain of %s@%d failed: %s", st.job, st.step, exc)
            metrics.TIER_FAILURES.labels("disk", "drain").inc()
            await self.catalog.set_tier(st, TierName.DISK, TierState.FAILED, str(exc))
            self._node_part_done(st, False, str(exc))
        else:
            elapsed = time.monotonic() - t0
            self.last_drain = {"job": st.job, "step": st.step, "bytes": st.nbytes, "seconds": elapsed}
            log.info("step %s@%d LOCAL_DURABLE (%d bytes in %.3fs)", st.job, st.step, st.nbytes, elapsed)
            self._node_part_done(st, True, "")
            await self.catalog.set_tier(st, TierName.DISK, TierState.COMMITTED)
            if self.on_commit is not None:
                self.on_commit()
            metrics.TIER_WRITTEN_BYTES.labels("disk").inc(st.nbytes)
            metrics.TIER_OP_SECONDS.labels("disk", "drain").observe(elapsed)
            metrics.LAST_COMMITTED_STEP.labels(st.job, "disk").set(st.step)
            await self._retain(st.job)
        finally:
            for slot in slots:
                assert slot is not None
                await self.pool.release_reader(slot)

    def _node_part_done(self, st: StepState, ok: bool, reason: str) -> None:
        """In a multi-node step this node's commit is only its part: LOCAL_DURABLE waits for the
        other nodes' (set before the COMMITTED state is published, so no waiter sees it early)."""
        if self.across_nodes is None or not st.node_ranks or len(st.node_ranks) >= st.world_size:
            return
        if ok:
            st.across_nodes[TierName.DISK] = None
        self.across_nodes(st, ok, reason)

    async def _retain(self, job: str) -> None:
        assert self.tier is not None
        await apply_retention(
            job, self.tier, TierName.DISK, catalog=self.catalog, executor=self.executor,
            max_to_keep=self.cfg.max_to_keep, keep_period=self.cfg.keep_period,
            keep=(self.in_use, self.operator_pins), delete_errors=(OSError,), forget_unless_in_memory=True, log=log,
        )
