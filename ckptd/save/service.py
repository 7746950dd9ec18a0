"""The save path: BeginSave, CommitShard, AbortSave, the background checksum and the lease reaper.

``SavePath`` owns the save leases (``leases``) and the shards being claimed between BeginSave's
checks and its lease. It is handed the catalog, the slot pool, the disk tier (to refuse a step
already committed there), the executor, the memory section of the config, the task set its
checksum passes run in, the shutdown flag, and two callbacks: ``kick_drain`` (a slot is recorded:
the disk write may start) and ``on_staged`` (a step is complete in memory: wake every drain).
The gRPC servicer calls ``begin_save``/``commit_shard``/``abort_save``; the daemon's lease reaper
calls ``reap_expired``.

Invariants: a lease is handed out only for a valid (job, step, rank, world_size) that is not
already staged, leased or committed (a shard is claimed before the first await, so two concurrent
BeginSaves of it cannot both pass); CommitShard validates the layout against the lease before
recording the shard; the daemon checksums the slot after CommitShard returns and only a
checksummed shard counts toward a committed step. A slot gets a sidecar only after CommitShard:
a lease dropped by AbortSave, an expired deadline or a dead client leaves the slot torn and free.
One rank that cannot get a slot abandons its step on every rank (it could never commit).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptd.core import metrics
from ckptd.core.errors import (
    AlreadyExists,
    BudgetExhausted,
    DaemonUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ckptd.core.integrity import parallel_chunk_crcs
from ckptd.core.layout import TensorEntry, chunk_count
from ckptd.core.layout_memo import LayoutMemo
from ckptd.core.manifest import MANIFEST_NAME, ShardEntry
from ckptd.core.types import (
    Level,
    TierName,
    validate_incarnation,
    validate_job,
    validate_node_ranks,
    validate_rank,
    validate_step,
)
from ckptd.drains.tasks import Shutdown, TaskSet
from ckptd.memory.catalog import Catalog, ShardRecord, StepState, TierState, gc_catalog, sidecar_meta
from ckptd.memory.slots import Slot, SlotPool

if TYPE_CHECKING:
    from ckptd.core.config import MemorySection
    from ckptd.tiers.disk import DiskTier

log = logging.getLogger("ckptd.daemon")  # the daemon's logger: operators filter on it


@dataclass
class SaveLease:
    lease_id: str
    job: str
    step: int
    rank: int
    world_size: int
    nbytes: int
    slot: Slot
    client_pid: int
    deadline_s: float
    node_ranks: tuple[int, ...] = ()
    incarnation: str = ""  # the writer's incarnation: recorded with its shard


def pid_alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (a killed trainer its parent has not reaped)."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def check_ids(job: str, step: int, rank: int, world_size: int, incarnation: str = "") -> None:
    try:
        validate_job(job)
        validate_step(step)
        validate_rank(rank, world_size)
        validate_incarnation(incarnation)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class SavePath:
    """The save RPCs of one daemon and the leases they hand out."""

    def __init__(self, catalog: Catalog, pool: SlotPool, disk: DiskTier | None, executor: Executor,
                 memory: MemorySection, tasks: TaskSet, shutdown: Shutdown, kick_drain: Callable[[], None],
                 on_staged: Callable[[], None], layouts: LayoutMemo | None = None) -> None:
        self.catalog = catalog
        self.layouts = layouts if layouts is not None else LayoutMemo()  # a job's layout, checked once
        self.pool = pool
        self.disk = disk
        self.executor = executor
        self.memory = memory
        self.tasks = tasks
        self.shutdown = shutdown
        self.kick_drain = kick_drain
        self.on_staged = on_staged
        self.leases: dict[str, SaveLease] = {}
        self._beginning: set[tuple[str, int, int]] = set()  # BeginSaves between check and lease

    async def begin_save(self, job: str, step: int, rank: int, world_size: int, nbytes: int,
                         wait: bool | None, wait_timeout_s: float | None, client_pid: int,
                         node_ranks: tuple[int, ...] = (), incarnation: str = "",
                         resumed_from: int | None = None, new_world_size: bool = False) -> SaveLease:
        if self.shutdown.draining:
            raise DaemonUnavailable("daemon is draining for shutdown; not accepting saves")
        check_ids(job, step, rank, world_size)
        try:
            node_ranks = validate_node_ranks(node_ranks, world_size, rank)
            validate_incarnation(incarnation)
            if resumed_from is not None and resumed_from < -1:
                raise ValueError(f"resumed_from {resumed_from} is below -1")
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if incarnation and resumed_from is not None:
            await self._drop_stale_shards(job, rank, incarnation, resumed_from)
        if nbytes < 0 or nbytes > self.memory.max_shard_bytes:
            raise InvalidArgument(
                f"nbytes {nbytes} out of range [0, {self.memory.max_shard_bytes}] "
                "(memory.max_shard_bytes)")
        held = [s for s in self.catalog.steps(job)
                if s.in_memory or any(s.state(t) == TierState.COMMITTED for t in TierName)]
        if held and held[-1].world_size != world_size and not (new_world_size and step > held[-1].step):
            raise FailedPrecondition(
                f"job {job!r} is saved with world_size {held[-1].world_size} (step {held[-1].step}); this save "
                f"names world_size {world_size}: save under another job name, remove the job's steps first, "
                "or (a job resumed on another world size) opt in with allow_new_world_size for a newer step"
                + (f" (step {step} is not newer than {held[-1].step})" if new_world_size else ""))
        st = self.catalog.get(job, step)
        if st is not None:
            if st.world_size != world_size:
                raise FailedPrecondition(
                    f"step {step} of {job!r} has world_size {st.world_size}, not {world_size}")
            if st.shards and st.node_ranks != node_ranks:
                raise FailedPrecondition(
                    f"step {step} of {job!r} is held for node ranks {list(st.ranks)}, this save "
                    f"names {list(node_ranks or range(world_size))}")
            if st.state(TierName.MEMORY) == TierState.SKIPPED and not st.in_memory:
                raise BudgetExhausted(f"step {step} of {job!r} was skipped: "
                                      f"{st.tiers[TierName.MEMORY][1]}")
            if rank in st.shards or st.state(TierName.DISK) == TierState.COMMITTED:
                raise AlreadyExists(f"step {step} rank {rank} of {job!r} is already saved")
        for lease in list(self.leases.values()):
            if (lease.job, lease.step, lease.rank) == (job, step, rank):
                if time.monotonic() <= lease.deadline_s and pid_alive(lease.client_pid):
                    raise AlreadyExists(f"step {step} rank {rank} of {job!r} is being saved by another writer")
                # the holder died mid-copy (a restarted trainer re-saves faster than the reaper)
                log.warning("save lease of %s@%d rank %d expired (client gone); slot torn, not committed",
                            job, step, rank)
                await self.drop_lease(lease)
        # Claim (job, step, rank) before the first await: a concurrent BeginSave for the same
        # shard must not pass the checks above while this one waits for the disk or a slot.
        if (job, step, rank) in self._beginning:
            raise AlreadyExists(f"step {step} rank {rank} of {job!r} is being saved by another writer")
        self._beginning.add((job, step, rank))
        try:
            return await self._begin_save_claimed(job, step, rank, world_size, nbytes, wait,
                                                  wait_timeout_s, client_pid, st, node_ranks, incarnation)
        finally:
            self._beginning.discard((job, step, rank))

    async def _begin_save_claimed(self, job: str, step: int, rank: int, world_size: int, nbytes: int,
                                  wait: bool | None, wait_timeout_s: float | None, client_pid: int,
                                  st: StepState | None, node_ranks: tuple[int, ...], incarnation: str) -> SaveLease:
        # the catalog knows every step committed on disk; one stat (no listing) guards the rest
        if self.disk is not None and st is None and (self.disk.step_dir(job, step) / MANIFEST_NAME).exists():
            raise AlreadyExists(f"step {step} of {job!r} is already committed on disk")
        mem = self.memory
        do_wait = (mem.backpressure == "wait") if wait is None else wait
        timeout_s = mem.wait_timeout_s if wait_timeout_s is None else wait_timeout_s
        t0 = time.monotonic()
        try:
            slot = await self.pool.lease((job, rank), nbytes, self.catalog.slot_reusable, do_wait,
                                         timeout_s, mem.slots_per_rank, spare=True)
        except BudgetExhausted as exc:
            metrics.SAVES_TOTAL.labels("no_slot").inc()
            await self._abandon_step(job, step, world_size, f"rank {rank} had no slot: {exc}")
            raise
        metrics.SLOT_WAIT_SECONDS.observe(time.monotonic() - t0)
        lease = SaveLease(uuid.uuid4().hex, job, step, rank, world_size, nbytes, slot,
                          client_pid if client_pid > 0 and pid_alive(client_pid) else 0,
                          time.monotonic() + mem.lease_timeout_s, node_ranks, incarnation)
        self.leases[lease.lease_id] = lease
        gc_catalog(self.catalog, job)
        return lease

    async def commit_shard(self, lease_id: str, job: str, step: int, rank: int, world_size: int,
                           nbytes: int, tensors: Sequence[TensorEntry], tree_json: str,
                           chunk_bytes: int, client_crcs: list[int], client_stall_s: float = 0.0) -> Level:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"unknown or expired save lease {lease_id[:16]!r}")
        if (lease.job, lease.step, lease.rank, lease.world_size) != (job, step, rank, world_size) \
                or not 0 <= nbytes <= lease.nbytes:
            raise InvalidArgument("CommitShard does not match its BeginSave (job/step/rank/world_size, "
                                  "nbytes at most the leased)")
        expected_chunk = self.memory.chunk_bytes
        if client_crcs and (chunk_bytes != expected_chunk
                            or len(client_crcs) != chunk_count(nbytes, expected_chunk)):
            raise InvalidArgument(f"chunk_crc32c must cover {nbytes} bytes in chunks of {expected_chunk}")
        try:
            tensors = tuple(tensors)
            tree = self.layouts.check(tensors, nbytes, tree_json)
        except ValueError as exc:
            raise InvalidArgument(f"bad shard layout: {exc}") from None
        del self.leases[lease_id]
        st = self.catalog.ensure(job, step, world_size)
        if not st.shards:
            st.node_ranks = lease.node_ranks
        if st.state(TierName.MEMORY) == TierState.SKIPPED and not st.in_memory:
            lease.slot.content = None
            await self.pool.release_write(lease.slot)
            raise BudgetExhausted(f"step {step} of {job!r} was skipped: {st.tiers[TierName.MEMORY][1]}")
        entry = ShardEntry(rank, nbytes, expected_chunk, (), tensors, tree)
        rec = ShardRecord(job, step, entry, lease.slot, checksummed=False, recorded=False, writer=lease.incarnation,
                          writer_pid=lease.client_pid)
        st.shards[rank] = rec
        lease.slot.content = rec
        lease.slot.writing = False
        await self.catalog.set_tier(st, TierName.MEMORY, TierState.IN_PROGRESS)
        metrics.SAVES_TOTAL.labels("staged").inc()
        metrics.TIER_WRITTEN_BYTES.labels("memory").inc(nbytes)
        if 0 < client_stall_s < 86400:
            metrics.SAVE_BLOCKING_SECONDS.observe(client_stall_s)
        self.pool.hold(lease.slot)  # the crc pass's, taken now: no lease may reuse the slot before it runs
        self.tasks.spawn(self._checksum(st, rec, client_crcs), f"crc-{job}-{step}-{rank}")
        return Level.STAGED

    async def _checksum(self, st: StepState, rec: ShardRecord, client_crcs: list[int]) -> None:
        """Checksum a freshly staged slot off the hot path; verify the client's sums if sent.
        The caller took the slot's reader count for this pass; it is given back here."""
        slot = rec.slot
        assert slot is not None
        loop = asyncio.get_running_loop()
        try:
            # Record the committed slot first ("crc pending"): from here on a daemon crash keeps
            # it (the next daemon checksums it at adoption), and the disk drain may start while
            # the crc pass below runs. A slot that never got CommitShard never gets a sidecar.
            await loop.run_in_executor(self.executor, self.pool.write_sidecar, slot, sidecar_meta(st, rec))
            rec.recorded = True
            if st.staged_in_slots:
                self.kick_drain()  # the disk write overlaps the checksum pass
            entry = rec.entry
            crcs = await parallel_chunk_crcs(loop, self.executor, slot.view(entry.nbytes), entry.chunk_bytes)
            if client_crcs and crcs != list(client_crcs):
                bad = next(i for i, (a, b) in enumerate(zip(crcs, client_crcs)) if a != b)
                metrics.CHECKSUM_FAILURES.labels("memory").inc()
                rec.slot = None
                slot.content = None
                del st.shards[entry.rank]
                await self.catalog.set_tier(st, TierName.MEMORY, TierState.FAILED,
                                            f"rank {entry.rank}: crc32c of chunk {bad} differs from the client's")
                return
            if slot.content is not rec:
                return  # the step was abandoned meanwhile
            entry = ShardEntry(entry.rank, entry.nbytes, entry.chunk_bytes, tuple(crcs),
                               entry.tensors, entry.tree)
            rec.entry = entry
            meta = sidecar_meta(st, rec)
            meta["shard"]["chunk_crc32c"] = list(crcs)
            meta.pop("crc_pending", None)
            await loop.run_in_executor(self.executor, self.pool.write_sidecar, slot, meta)
            rec.checksummed = True
        except Exception as exc:  # noqa: BLE001
            log.error("checksumming %s@%d rank %d failed: %s", st.job, st.step, rec.entry.rank, exc)
            await self.catalog.set_tier(st, TierName.MEMORY, TierState.FAILED, str(exc))
            return
        finally:
            await self.pool.release_reader(slot)
        if st.in_memory:
            log.info("step %s@%d STAGED on all %d ranks", st.job, st.step, st.world_size)
            await self.catalog.set_tier(st, TierName.MEMORY, TierState.COMMITTED)
            metrics.LAST_COMMITTED_STEP.labels(st.job, "memory").set(st.step)
            await self.pool.notify()
            self.on_staged()
        else:
            await self.catalog.notify()

    async def _drop_stale_shards(self, job: str, rank: int, incarnation: str, resumed_from: int) -> None:
        """A writer of ``rank`` that resumed from step ``resumed_from`` (its job restarted and
        restored) saves. In uncommitted steps after ``resumed_from``, shards staged before the
        resume belong to a dead run and must not mix with the new one: this rank's shards of
        another incarnation, and any rank's shards whose writer process is gone. Shards of live
        writers of other ranks, of unknown writers, and every committed step stay. A reader
        (ckptctl, another process restoring) never causes this, nor does a writer that never
        restored (a second live writer of the rank gets AlreadyExists)."""

        def stale(rec: ShardRecord) -> bool:
            if not rec.writer or rec.writer == incarnation:
                return False
            return rec.entry.rank == rank or (rec.writer_pid > 0 and not pid_alive(rec.writer_pid))

        await self._drop_shards(job, resumed_from, stale, f"staged before the job resumed from step {resumed_from}")

    async def retire(self, job: str, rank: int, incarnation: str, restored_step: int) -> None:
        """The writer ``incarnation`` of ``rank`` rolled its own state back to ``restored_step`` (its
        manager restored): its shards of uncommitted steps after that are its dead past."""
        if incarnation:
            await self._drop_shards(job, restored_step,
                                    lambda rec: rec.entry.rank == rank and rec.writer == incarnation,
                                    f"its writer rolled back to step {restored_step}")

    async def _drop_shards(self, job: str, after_step: int, stale: Callable[[ShardRecord], bool], why: str) -> None:
        """Drop the ``stale`` shards of the job's steps after ``after_step`` committed nowhere."""
        loop = asyncio.get_running_loop()
        for st in self.catalog.steps(job):
            if (st.step <= after_step or st.in_memory
                    or any(st.state(t) == TierState.COMMITTED for t in TierName)):
                continue
            for r, rec in list(st.shards.items()):
                if not stale(rec):
                    continue
                del st.shards[r]
                if rec.slot is not None and rec.slot.content is rec:
                    rec.slot.content = None
                    await loop.run_in_executor(self.executor, rec.slot.meta_path.unlink, True)
                log.info("dropping rank %d's shard of uncommitted step %s@%d: %s", r, job, st.step, why)
            if not st.shards:
                self.catalog.forget(job, st.step)
        await self.pool.notify()

    async def _abandon_step(self, job: str, step: int, world_size: int, reason: str) -> None:
        """One rank could not stage this step, so it can never commit: free the shards the
        other ranks staged and make their later BeginSave/CommitShard of it skip too."""
        st = self.catalog.ensure(job, step, world_size)
        if st.in_memory or st.world_size != world_size:
            return
        loop = asyncio.get_running_loop()
        for rec in st.shards.values():
            if rec.slot is not None and rec.slot.content is rec:
                rec.slot.content = None
                await loop.run_in_executor(self.executor, rec.slot.meta_path.unlink, True)
        st.shards.clear()
        log.warning("step %s@%d skipped on every rank: %s", job, step, reason)
        await self.catalog.set_tier(st, TierName.MEMORY, TierState.SKIPPED, reason)
        await self.pool.notify()

    async def abort_save(self, lease_id: str) -> None:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"unknown or expired save lease {lease_id[:16]!r}")
        await self.drop_lease(lease)

    async def reap_expired(self) -> None:
        """Drop the leases whose client died or whose deadline passed."""
        now = time.monotonic()
        for lease in list(self.leases.values()):
            if now > lease.deadline_s or not pid_alive(lease.client_pid):
                log.warning("save lease of %s@%d rank %d expired (client gone); slot torn, "
                            "not committed", lease.job, lease.step, lease.rank)
                await self.drop_lease(lease)

    def saving(self, job: str, step: int) -> bool:
        """Does a save lease still write a shard of this step?"""
        return any((lease.job, lease.step) == (job, step) for lease in self.leases.values())

    async def drop_lease(self, lease: SaveLease) -> None:
        self.leases.pop(lease.lease_id, None)
        lease.slot.content = None
        await self.pool.release_write(lease.slot)
