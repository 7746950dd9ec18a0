"""The background upload: local tiers -> object store, and the global commit of each step.

One task, owned by the daemon, started with it and awaited on shutdown. Per job it takes the
newest step that is ready locally and not yet handled by the object tier; older pending steps are
marked SKIPPED (superseded), so a slow or throttling store delays persistence but never builds a
queue and never blocks training. "Ready locally" follows memory -> disk -> object: with the disk
tier on, a step is uploaded from its committed disk files (so slow uploads never hold shm slots);
from its memory slots when the disk tier is off or failed for that step.

Every source is verified against the shard's chunk crc32c before it leaves the node. Each node
uploads its own ranks' shards and then one record for all of them; the step's coordinator (the daemon that
holds rank 0) writes the manifest with a create-only put once the records of all ``world_size``
ranks are in the store, then applies object-tier retention. Other nodes mark the step PERSISTED
when they see the manifest.

Requests per key prefix stay bounded as the job grows (docs/scale.md): a node waiting for the
coordinator's commit asks for the step's manifest with one HEAD (never a listing of the job),
every ``POLL_S`` or, in a large job, every ``world_size / COMMIT_CHECKS_PER_S`` seconds, so the
job's nodes together ask at most ``COMMIT_CHECKS_PER_S`` times a second; the coordinator reads
each rank record once, however often it lists the step. A step without a manifest does not exist in the store, whatever
objects it left behind; cleanup at start-up aborts stale multipart uploads.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import time
import traceback
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from ckptd.core import failpoints, metrics
from ckptd.core.config import ObjectSection
from ckptd.core.errors import AlreadyExists, CkptdError, IntegrityError, TierFailed
from ckptd.core.integrity import first_bad_chunk
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import TierName
from ckptd.drains.retainer import apply_retention
from ckptd.drains.worker import Worker
from ckptd.memory.catalog import Catalog, StepState, TierState
from ckptd.memory.slots import SlotPool
from ckptd.tiers.base import CommitTier
from ckptd.tiers.disk import DiskTier

log = logging.getLogger("ckptd.uploader")

POLL_S = 0.5
COMMIT_CHECKS_PER_S = 1000.0  # bound on the manifest HEADs a whole job's waiting nodes send per second


@dataclass
class _Awaiting:
    st: StepState
    deadline_s: float
    coordinator: bool
    next_check_s: float = 0.0
    records: dict[int, ShardEntry] = field(default_factory=dict)  # coordinator: rank records read so far


def check_interval_s(world_size: int) -> float:
    """Seconds between a waiting node's checks of one step's manifest."""
    return max(POLL_S, world_size / COMMIT_CHECKS_PER_S)


class ObjectUploader(Worker):
    """Owner of the upload task and of the pending global commits."""

    name = "object-uploader"

    def __init__(self, catalog: Catalog, pool: SlotPool, disk: DiskTier | None, in_upload: dict[str, set[int]],
                 tier: CommitTier, cfg: ObjectSection, executor: Executor,
                 operator_pins: dict[str, set[int]] | None = None) -> None:
        super().__init__()
        self.catalog = catalog
        self.pool = pool
        self.disk = disk
        self.in_upload = in_upload  # steps read from their disk copy now: disk retention keeps them
        self.tier = tier
        self.cfg = cfg
        self.executor = executor
        self._awaiting: dict[tuple[str, int], _Awaiting] = {}
        self.last_upload: dict[str, Any] = {}
        #: ckptctl pin: retention keeps them (the daemon's PinStore.pins)
        self.operator_pins: dict[str, set[int]] = {} if operator_pins is None else operator_pins

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await self._wait_kick(POLL_S)
            if self.tier.has_failed_uploads:  # between uploads: nothing of ours is in flight
                await loop.run_in_executor(self.executor, self.tier.abort_failed_uploads)
            while not self._stopping and (st := await self._next()) is not None:
                await self._upload(st)
            await self._check_commits()

    # -- choosing ---------------------------------------------------------------------------
    def _ready(self, st: StepState) -> bool:
        if self.disk is not None:
            disk = st.state(TierName.DISK)
            if disk == TierState.COMMITTED:
                return True
            if disk in (TierState.PENDING, TierState.IN_PROGRESS):
                return False
        return st.in_memory

    async def _next(self) -> StepState | None:
        for job in list(self.catalog.jobs):
            pending = [s for s in self.catalog.steps(job)  # no shard records: catalogued from disk
                       if s.state(TierName.OBJECT) == TierState.PENDING
                       and (s.shards or (self.disk is not None and s.state(TierName.DISK) == TierState.COMMITTED))]
            ready = [s for s in pending if self._ready(s)]
            if not ready:
                continue
            newest = ready[-1]
            for old in pending:
                if old.step < newest.step:
                    await self.catalog.set_tier(old, TierName.OBJECT, TierState.SKIPPED,
                                                f"superseded by step {newest.step}")
            if newest.step % self.cfg.every_n_steps:
                await self.catalog.set_tier(newest, TierName.OBJECT, TierState.SKIPPED,
                                            f"not a multiple of object.every_n_steps={self.cfg.every_n_steps}")
                continue
            return newest
        return None

    # -- uploading --------------------------------------------------------------------------
    async def _upload(self, st: StepState) -> None:
        loop = asyncio.get_running_loop()
        await self.catalog.set_tier(st, TierName.OBJECT, TierState.IN_PROGRESS)
        in_use = self.in_upload.setdefault(st.job, set())  # disk retention keeps it meanwhile
        in_use.add(st.step)
        t0 = time.monotonic()
        nbytes = 0
        entries: list[ShardEntry] | None = None
        try:
            entries = await self._entries(st)
            if entries is None:
                await self.catalog.set_tier(st, TierName.OBJECT, TierState.COMMITTED, "already in the store")
                return
            for entry in entries:
                await self._upload_shard(st, entry)
                nbytes += entry.nbytes
            await self._record(st, entries)
        except AlreadyExists:
            # The step is committed in the store: nothing to upload. A step this node restored from
            # another copy (a peer, the store: its shards have no writer) holds the store's content
            # by construction, every chunk verified; for a step saved here, the store's manifest
            # (one read) tells whether our ranks' checksums match.
            saved_here = not st.shards or any(rec.writer for rec in st.shards.values())
            msg = await self._compare_with_store(st, entries or []) if saved_here else "already in the store"
            await self.catalog.set_tier(st, TierName.OBJECT, TierState.COMMITTED, msg)
            return
        except Exception as exc:  # noqa: BLE001 - a failed upload degrades the level, nothing more
            log.error("upload of %s@%d failed: %s", st.job, st.step, exc)
            metrics.TIER_FAILURES.labels("object", "upload").inc()
            await self.catalog.set_tier(st, TierName.OBJECT, TierState.FAILED, str(exc))
            return
        finally:
            in_use.discard(st.step)
        elapsed = time.monotonic() - t0
        metrics.TIER_WRITTEN_BYTES.labels("object").inc(nbytes)
        metrics.TIER_OP_SECONDS.labels("object", "upload").observe(elapsed)
        self.last_upload = {"job": st.job, "step": st.step, "bytes": nbytes, "seconds": elapsed}
        coordinator = 0 in st.ranks
        self._awaiting[(st.job, st.step)] = _Awaiting(st, time.monotonic() + self.cfg.commit_wait_s, coordinator)
        del loop

    async def _compare_with_store(self, st: StepState, entries: list[ShardEntry]) -> str:
        """The catalog message for a step found committed in the store: whether the store's copy of
        this node's shards has the same size and chunk checksums as ours (one manifest read)."""
        loop = asyncio.get_running_loop()
        try:
            stored = await loop.run_in_executor(self.executor, self.tier.read_manifest, st.job, st.step)
        except CkptdError as exc:
            log.warning("%s@%d is already in the store; its manifest could not be read to compare: %s",
                        st.job, st.step, exc)
            return "already in the store (not compared)"
        theirs = {s.rank: (s.nbytes, tuple(s.chunk_crc32c)) for s in stored.shards}
        differ = [e.rank for e in entries if theirs.get(e.rank) != (e.nbytes, tuple(e.chunk_crc32c))]
        if differ:
            log.warning("%s@%d is already committed in the store with other content for rank(s) %s than this "
                        "node's copy; the store's copy is kept", st.job, st.step, differ)
            return f"already in the store (its content of rank(s) {differ} differs from this node's copy)"
        return "already in the store"

    async def _entries(self, st: StepState) -> list[ShardEntry] | None:
        """This node's shard entries of the step: from its shard records, or, for a step known
        only from its disk manifest (a daemon restarted without its shared memory), from that
        manifest; None when such a step is already committed in the store."""
        if st.shards:
            return [st.shards[r].entry for r in sorted(st.shards)]
        assert self.disk is not None
        loop = asyncio.get_running_loop()
        if st.step in await loop.run_in_executor(self.executor, self.tier.list_committed, st.job):
            return None
        manifest = await loop.run_in_executor(self.executor, self.disk.read_manifest, st.job, st.step)
        return list(manifest.shards)

    async def _upload_shard(self, st: StepState, entry: ShardEntry) -> None:
        """Upload one local shard from its verified disk file, else from its verified slot."""
        rank = entry.rank
        rec = st.shards.get(rank)
        loop = asyncio.get_running_loop()
        failpoints.hit("object.upload.before_shard")
        errors: list[str] = []
        if self.disk is not None and st.state(TierName.DISK) == TierState.COMMITTED:
            try:
                await loop.run_in_executor(self.executor, self._upload_from_disk, st, entry)
                failpoints.hit("object.upload.after_shard")
                return
            except (IntegrityError, OSError) as exc:
                errors.append(f"disk copy: {exc}")
        slot = rec.slot if rec is not None else None
        if rec is None or slot is None or slot.content is not rec:
            raise TierFailed(f"no valid local copy of {st.job}@{st.step} rank {rank} to upload: "
                             + ("; ".join(errors) or "memory copy evicted"))
        self.pool.hold(slot)
        view = slot.view(entry.nbytes)
        try:
            bad = await loop.run_in_executor(self.executor, first_bad_chunk, view, entry.chunk_bytes,
                                             entry.chunk_crc32c)
            if bad is not None:
                raise IntegrityError(f"{slot.path}: crc32c mismatch in chunk {bad}; not uploaded")
            await loop.run_in_executor(self.executor, self.tier.put_shard, st.job, st.step, entry, view)
        finally:
            view.release()
            await self.pool.release_reader(slot)
        failpoints.hit("object.upload.after_shard")

    def _upload_from_disk(self, st: StepState, entry: ShardEntry) -> None:
        assert self.disk is not None
        path = self.disk.shard_path(st.job, st.step, entry)
        with open(path, "rb") as f:
            if entry.nbytes == 0:
                self.tier.put_shard(st.job, st.step, entry, memoryview(b""))
                return
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            view = memoryview(mm)
            try:
                if view.nbytes != entry.nbytes:
                    raise IntegrityError(f"{path}: size {view.nbytes} != {entry.nbytes}")
                bad = first_bad_chunk(view, entry.chunk_bytes, entry.chunk_crc32c)
                if bad is not None:
                    raise IntegrityError(f"{path}: crc32c mismatch in chunk {bad}; not uploaded")
                self.tier.put_shard(st.job, st.step, entry, view)
            except BaseException as exc:
                # The frames of the tier's call may still hold views of the mapping (e.g. put_shard
                # raising AlreadyExists): drop their locals, or mm.close() below raises BufferError
                # and hides the real error.
                traceback.clear_frames(exc.__traceback__)
                raise
            finally:
                view.release()
        finally:
            try:
                mm.close()
            except BufferError:  # a view still alive elsewhere: the mapping goes with its last view
                log.debug("%s: mapping still exported at close; left to the last view", path)

    async def _record(self, st: StepState, entries: list[ShardEntry]) -> None:
        """One record for all of this node's shards of the step (not one per rank)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.tier.put_shard_meta, st.job, st.step, entries,
                                   st.world_size)

    # -- global commit ----------------------------------------------------------------------
    async def _check_commits(self) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for key, aw in list(self._awaiting.items()):
            st = aw.st
            if now < aw.next_check_s and now <= aw.deadline_s:
                continue
            aw.next_check_s = now + (POLL_S if aw.coordinator else check_interval_s(st.world_size))
            try:
                if aw.coordinator:
                    done = await self._try_commit(aw)
                else:
                    done = await loop.run_in_executor(self.executor, self.tier.is_committed, st.job, st.step)
            except CkptdError as exc:
                log.warning("commit check of %s@%d: %s", st.job, st.step, exc)
                done = False
            if done:
                del self._awaiting[key]
                log.info("step %s@%d PERSISTED", st.job, st.step)
                metrics.LAST_COMMITTED_STEP.labels(st.job, "object").set(st.step)
                await self.catalog.set_tier(st, TierName.OBJECT, TierState.COMMITTED)
                if aw.coordinator:
                    await self._retain(st.job)
            elif time.monotonic() > aw.deadline_s:
                del self._awaiting[key]
                what = "shards of other nodes" if aw.coordinator else "the coordinator's manifest"
                await self.catalog.set_tier(
                    st, TierName.OBJECT, TierState.FAILED,
                    f"{what} did not arrive within object.commit_wait_s={self.cfg.commit_wait_s:g}s")

    async def _try_commit(self, aw: _Awaiting) -> bool:
        loop = asyncio.get_running_loop()
        st, records = aw.st, aw.records
        records.update(await loop.run_in_executor(self.executor, self.tier.list_shard_metas, st.job, st.step,
                                                  st.world_size, tuple(records)))
        if len(records) < st.world_size:
            return False
        manifest = Manifest(st.job, st.step, st.world_size,
                            tuple(records[r] for r in range(st.world_size)), st.created_unix_s, st.extra)
        failpoints.hit("object.commit.before_manifest")
        try:
            await loop.run_in_executor(self.executor, self.tier.commit, manifest)
        except AlreadyExists:
            pass
        return True

    async def _retain(self, job: str) -> None:
        await apply_retention(
            job, self.tier, TierName.OBJECT, catalog=self.catalog, executor=self.executor,
            max_to_keep=self.cfg.max_to_keep, keep_period=self.cfg.keep_period, keep=(self.operator_pins,),
            delete_errors=(CkptdError,), list_errors=(CkptdError,), log=log,
        )
