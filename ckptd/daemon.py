"""The daemon core: owns the slot pool, the catalog, the tiers and every background task.

``Daemon`` is transport-free: ``server.py`` adapts gRPC to these methods. Life cycle:
``start()`` takes the single-instance lock, recovers the disk tier (temp and uncommitted step
directories removed, committed manifests catalogued), re-adopts surviving shm slots whose
checksums verify, and starts the drainer and the lease reaper. ``stop()`` refuses new saves,
finishes pending disk commits within the shutdown deadline, stops the tasks and releases the lock.

Save path invariants: a lease is handed out only for a valid (job, step, rank, world_size) that is
not already staged, leased or committed; CommitShard validates the layout against the lease before
recording the shard; the daemon checksums the slot after CommitShard returns and only a
checksummed shard counts toward a committed step.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd import __version__, fsops, metrics
from ckptd.catalog import (
    Catalog,
    ShardRecord,
    StepState,
    TierState,
    entry_from_sidecar,
    gc_catalog,
    sidecar_meta,
)
from ckptd.config import Config
from ckptd.errors import (
    AlreadyExists,
    BudgetExhausted,
    CkptdError,
    DaemonUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ckptd.integrity import chunk_crcs, first_bad_chunk
from ckptd.layout import TensorEntry, chunk_count, parse_tree, validate_tensors
from ckptd.manifest import MANIFEST_NAME, Manifest, ShardEntry
from ckptd.pipeline import DiskDrainer
from ckptd.restore import Restorer, RestoreResult
from ckptd.restore_stream import RestoreEvent, RestoreProgress
from ckptd.shm import Slot, SlotPool
from ckptd.tiers.disk import DiskTier

if TYPE_CHECKING:
    from ckptd.admin import AdminResult, StepAdmin
    from ckptd.replicas import SlotReplicaStore
    from ckptd.replication import PeerDirectory, Replicator
    from ckptd.tiers.object import ObjectTier
    from ckptd.uploader import ObjectUploader

from ckptd.types import LEVEL_TIER, Level, TierName, validate_job, validate_node_ranks, validate_rank, validate_step

log = logging.getLogger("ckptd.daemon")


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


@dataclass
class RestoreLease:
    lease_id: str
    slot: Slot
    client_pid: int
    deadline_s: float


def _pid_alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (a killed trainer its parent has not reaped)."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def _check_ids(job: str, step: int, rank: int, world_size: int) -> None:
    try:
        validate_job(job)
        validate_step(step)
        validate_rank(rank, world_size)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.executor = ThreadPoolExecutor(cfg.daemon.io_threads, thread_name_prefix="ckptd-io")
        self.pool = SlotPool(cfg.shm_path, cfg.memory.budget_bytes)
        self.catalog = Catalog()
        self.disk = (
            DiskTier(cfg.daemon.root / "data", cfg.disk.direct_io, cfg.disk.write_block_bytes)
            if cfg.disk.enabled else None
        )
        self.drainer = DiskDrainer(self.catalog, self.pool, self.disk, cfg.disk, self.executor)
        self.object: ObjectTier | None = None
        self.uploader: ObjectUploader | None = None
        if cfg.object.enabled:
            from ckptd.tiers.object import ObjectTier  # boto3 is heavy: only when configured
            from ckptd.uploader import ObjectUploader

            self.object = ObjectTier(cfg.object)
            self.uploader = ObjectUploader(self.catalog, self.pool, self.disk, self.drainer, self.object,
                                           cfg.object, self.executor)
            self.drainer.on_commit = self.uploader.kick
        self.restorer = Restorer(self.catalog, self.pool, self.disk, self.executor,
                                 cfg.memory.wait_timeout_s, self.object)
        self.restorer.on_adopt = self.drainer.kick
        self.peers: PeerDirectory | None = None
        self.replicas: SlotReplicaStore | None = None
        self.replicator: Replicator | None = None
        if cfg.peers.listen:
            self._init_peers()
        self.save_leases: dict[str, SaveLease] = {}
        self.restore_leases: dict[str, RestoreLease] = {}
        self.draining = False
        self._lock_fd = -1
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._beginning: set[tuple[str, int, int]] = set()  # BeginSaves between check and lease
        metrics.SHM_BUDGET_BYTES.set(cfg.memory.budget_bytes)
        metrics.SHM_BYTES_IN_USE.set_function(lambda: self.pool.bytes_in_use)
        metrics.INFLIGHT.labels("copying").set_function(lambda: len(self.save_leases))
        self.admin: StepAdmin = self._init_admin()  # ckptctl rm/pin/gc: loads pins, feeds retention

    # -- life cycle -------------------------------------------------------------------------
    def _lock(self) -> None:
        root = self.cfg.daemon.root
        fsops.DEFAULT.makedirs(root)  # durably: a power loss must not take a new root's first steps
        fd = os.open(root / "ckptd.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(f"another ckptd is already serving root {root}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def start(self) -> None:
        self._lock()
        loop = asyncio.get_running_loop()
        if self.disk is not None:
            removed = await loop.run_in_executor(self.executor, self.disk.recover)
            for path in removed:
                log.info("recovery removed uncommitted %s", path)
            await self._catalog_disk()
        await self._adopt_slots()
        if self.object is not None:
            await self._prepare_object_tier()
        self.drainer.start()
        if self.uploader is not None:
            self.uploader.start()
        if self.replicator is not None:
            self.replicator.start()
            self.replicator.kick()
        self._reaper = asyncio.create_task(self._reap_leases(), name="lease-reaper")

    def _init_peers(self) -> None:
        """Peer replication: this node's directory of peers, the replica store, the replicator."""
        from ckptd.peer_client import PeerClient
        from ckptd.peer_config import load_token, members, node_id, tls_files
        from ckptd.replicas import SlotReplicaStore
        from ckptd.replication import PeerDirectory, Replicator

        p = self.cfg.peers
        me = node_id(p)
        client = PeerClient(load_token(p), me, chunk_bytes=p.chunk_bytes, max_inflight_bytes=p.max_inflight_bytes,
                            max_attempts=p.max_attempts, tls=tls_files(p))
        self.peers = PeerDirectory(me, members(p, os.environ), client, p.replication_factor, p.push_timeout_s,
                                   p.fetch_timeout_s)
        self.replicas = SlotReplicaStore(self.catalog, self.pool, self.disk, self.executor, self.cfg, me)
        if p.replication_factor > 0 and self.peers.addrs:
            self.replicator = Replicator(self.catalog, self.pool, self.peers)
            self.restorer.on_adopt = self._after_adopt
        self.restorer.peers = self.peers

    def _after_adopt(self) -> None:
        self.drainer.kick()
        if self.replicator is not None:
            self.replicator.kick()  # top up replicas of a restored step

    async def _adopt_replica(self, slot: Slot, meta: dict[str, Any], valid: bool) -> None:
        """Re-adopt a replica held for another node, if its bytes verify and peers are on."""
        from ckptd.peer_types import ReplicaHeader

        try:
            if not valid or self.replicas is None:
                raise ValueError("crc32c mismatch" if not valid else "peer replication is off")
            job, step, world_size, created, entry = entry_from_sidecar(meta)
            header = ReplicaHeader(job, step, world_size, entry, str(meta["replica_of"]),
                                   tuple(meta.get("node_ranks") or ()), created, dict(meta.get("extra") or {}))
            header.validate()
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("removing replica slot %s: %s", slot.path.name, exc)
            await self.pool.free(slot)
            return
        self.replicas.adopt_sidecar(slot, meta, header)
        log.info("re-adopted replica of %s@%d rank %d (from %s)", header.job, header.step, header.rank,
                 header.source_node)

    async def _prepare_object_tier(self) -> None:
        """Abort stale multipart uploads and probe create-only puts; a store that is down at
        start-up is reported, not fatal (uploads retry when it returns)."""
        assert self.object is not None
        loop = asyncio.get_running_loop()
        try:
            aborted = await loop.run_in_executor(
                self.executor, self.object.cleanup_incomplete, self.object.stale_upload_age_s)
            for key, _ in aborted:
                log.info("aborted stale multipart upload of %s", key)
            await loop.run_in_executor(self.executor, self.object.conditional_put_supported)
        except CkptdError as exc:
            log.error("object tier not reachable at start-up: %s", exc)

    async def _catalog_disk(self) -> None:
        assert self.disk is not None
        loop = asyncio.get_running_loop()
        for job in await loop.run_in_executor(self.executor, self.disk.list_jobs):
            for step in await loop.run_in_executor(self.executor, self.disk.list_committed, job):
                try:
                    m: Manifest = await loop.run_in_executor(
                        self.executor, self.disk.read_manifest, job, step)
                except Exception as exc:  # noqa: BLE001 - a bad manifest is reported, not fatal
                    log.error("ignoring %s@%d on disk: %s", job, step, exc)
                    continue
                st = self.catalog.ensure(job, step, m.world_size)
                st.created_unix_s = m.created_unix_s
                st.extra = dict(m.extra)
                st.node_ranks = m.node_ranks
                st.tiers[TierName.DISK] = (TierState.COMMITTED, "")

    async def _adopt_slots(self) -> None:
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.executor, self.pool.scan)
        for slot, meta in found:
            if meta.get("crc_pending"):  # committed, daemon died before its crc pass: do it now
                try:
                    n = int(meta["shard"]["nbytes"])
                    if not 0 <= n <= slot.capacity:
                        raise ValueError("bad size")
                    meta["shard"]["chunk_crc32c"] = await loop.run_in_executor(
                        self.executor, chunk_crcs, slot.view(n), int(meta["shard"]["chunk_bytes"]))
                    await loop.run_in_executor(self.executor, self.pool.write_sidecar, slot,
                                               {k: v for k, v in meta.items() if k != "crc_pending"})
                except (ValueError, KeyError, TypeError, OSError) as exc:
                    log.warning("removing slot %s: bad pending sidecar: %s", slot.path.name, exc)
                    await self.pool.free(slot)
                    continue
            try:
                job, step, world_size, created, entry = entry_from_sidecar(meta)
                if entry.nbytes > slot.capacity:
                    raise ValueError("shard larger than its slot")
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("removing slot %s: bad sidecar: %s", slot.path.name, exc)
                await self.pool.free(slot)
                continue
            bad = await loop.run_in_executor(
                self.executor, first_bad_chunk, slot.view(entry.nbytes), entry.chunk_bytes,
                entry.chunk_crc32c)
            if meta.get("replica_of"):
                await self._adopt_replica(slot, meta, bad is None)
                continue
            st = self.catalog.ensure(job, step, world_size)
            existing = st.shards.get(entry.rank)
            if bad is not None or st.world_size != world_size or (
                existing is not None and existing.slot is not None
            ):
                log.warning("removing slot %s of %s@%d rank %d (%s)", slot.path.name, job, step,
                            entry.rank, "crc32c mismatch" if bad is not None else "conflict")
                await self.pool.free(slot)
                continue
            st.created_unix_s = created
            st.extra = dict(meta.get("extra") or {})
            st.node_ranks = validate_node_ranks(list(meta.get("node_ranks") or []), world_size)
            rec = ShardRecord(job, step, entry, slot)
            slot.content = rec
            slot.owner = (job, entry.rank)
            st.shards[entry.rank] = rec
            log.info("re-adopted slot of %s@%d rank %d from shared memory", job, step, entry.rank)
        for steps in self.catalog.jobs.values():
            for st in steps.values():
                if st.in_memory:
                    st.tiers[TierName.MEMORY] = (TierState.COMMITTED, "recovered from shm")
        self.drainer.kick()

    async def stop(self) -> bool:
        """Graceful stop; True when every pending disk commit finished."""
        self.draining = True
        # Shards already acknowledged STAGED may still be checksumming: let them finish (sidecar
        # written, step committed in memory, drainer kicked) so the drain below includes them.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.cfg.daemon.shutdown_timeout_s)
        if self.replicator is not None:  # best effort at shutdown; disk durability is not
            await self.replicator.stop(min(5.0, self.cfg.daemon.shutdown_timeout_s))
        if self.peers is not None:
            await self.peers.client.close()
        clean = await self.drainer.stop(self.cfg.daemon.shutdown_timeout_s)
        if self.uploader is not None:
            clean = await self.uploader.stop(self.cfg.daemon.shutdown_timeout_s) and clean
        for task in [*self._tasks, *([self._reaper] if self._reaper else [])]:
            task.cancel()
        for task in [*self._tasks, *([self._reaper] if self._reaper else [])]:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        return clean

    def close(self) -> None:
        """Release resources after the server stopped (executor, mappings, lock)."""
        self.executor.shutdown(wait=True)
        if self.object is not None:
            self.object.close()
        self.pool.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_leases(self) -> None:
        """Drop leases whose client died or whose deadline passed."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for lease in list(self.save_leases.values()):
                if now > lease.deadline_s or not _pid_alive(lease.client_pid):
                    log.warning("save lease of %s@%d rank %d expired (client gone); slot torn, "
                                "not committed", lease.job, lease.step, lease.rank)
                    await self._drop_save_lease(lease)
            for rl in list(self.restore_leases.values()):
                if now > rl.deadline_s or not _pid_alive(rl.client_pid):
                    await self.release_restore(rl.lease_id)

    async def _drop_save_lease(self, lease: SaveLease) -> None:
        self.save_leases.pop(lease.lease_id, None)
        lease.slot.content = None
        await self.pool.release_write(lease.slot)

    # -- save path --------------------------------------------------------------------------
    async def begin_save(self, job: str, step: int, rank: int, world_size: int, nbytes: int,
                         wait: bool | None, wait_timeout_s: float | None, client_pid: int,
                         node_ranks: tuple[int, ...] = ()) -> SaveLease:
        if self.draining:
            raise DaemonUnavailable("daemon is draining for shutdown; not accepting saves")
        _check_ids(job, step, rank, world_size)
        try:
            node_ranks = validate_node_ranks(node_ranks, world_size, rank)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if nbytes < 0 or nbytes > self.cfg.memory.max_shard_bytes:
            raise InvalidArgument(
                f"nbytes {nbytes} out of range [0, {self.cfg.memory.max_shard_bytes}] "
                "(memory.max_shard_bytes)")
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
        for lease in list(self.save_leases.values()):
            if (lease.job, lease.step, lease.rank) == (job, step, rank):
                if time.monotonic() <= lease.deadline_s and _pid_alive(lease.client_pid):
                    raise AlreadyExists(f"step {step} rank {rank} of {job!r} is being saved by another writer")
                # the holder died mid-copy (a restarted trainer re-saves faster than the reaper)
                log.warning("save lease of %s@%d rank %d expired (client gone); slot torn, not committed",
                            job, step, rank)
                await self._drop_save_lease(lease)
        # Claim (job, step, rank) before the first await: a concurrent BeginSave for the same
        # shard must not pass the checks above while this one waits for the disk or a slot.
        if (job, step, rank) in self._beginning:
            raise AlreadyExists(f"step {step} rank {rank} of {job!r} is being saved by another writer")
        self._beginning.add((job, step, rank))
        try:
            return await self._begin_save_claimed(job, step, rank, world_size, nbytes, wait,
                                                  wait_timeout_s, client_pid, st, node_ranks)
        finally:
            self._beginning.discard((job, step, rank))

    async def _begin_save_claimed(self, job: str, step: int, rank: int, world_size: int, nbytes: int,
                                  wait: bool | None, wait_timeout_s: float | None, client_pid: int,
                                  st: StepState | None, node_ranks: tuple[int, ...]) -> SaveLease:
        # the catalog knows every step committed on disk; one stat (no listing) guards the rest
        if self.disk is not None and st is None and (self.disk.step_dir(job, step) / MANIFEST_NAME).exists():
            raise AlreadyExists(f"step {step} of {job!r} is already committed on disk")
        mem = self.cfg.memory
        do_wait = (mem.backpressure == "wait") if wait is None else wait
        timeout_s = mem.wait_timeout_s if wait_timeout_s is None else wait_timeout_s
        t0 = time.monotonic()
        try:
            slot = await self.pool.lease((job, rank), nbytes, self.catalog.slot_reusable, do_wait,
                                         timeout_s, mem.slots_per_rank)
        except BudgetExhausted as exc:
            metrics.SAVES_TOTAL.labels("no_slot").inc()
            await self._abandon_step(job, step, world_size, f"rank {rank} had no slot: {exc}")
            raise
        metrics.SLOT_WAIT_SECONDS.observe(time.monotonic() - t0)
        lease = SaveLease(uuid.uuid4().hex, job, step, rank, world_size, nbytes, slot,
                          client_pid if client_pid > 0 and _pid_alive(client_pid) else 0,
                          time.monotonic() + mem.lease_timeout_s, node_ranks)
        self.save_leases[lease.lease_id] = lease
        gc_catalog(self.catalog, job)
        return lease

    async def commit_shard(self, lease_id: str, job: str, step: int, rank: int, world_size: int,
                           nbytes: int, tensors: list[TensorEntry], tree_json: str,
                           chunk_bytes: int, client_crcs: list[int], client_stall_s: float = 0.0) -> Level:
        lease = self.save_leases.get(lease_id)
        if lease is None:
            raise NotFound(f"unknown or expired save lease {lease_id[:16]!r}")
        if (lease.job, lease.step, lease.rank, lease.world_size, lease.nbytes) != (
                job, step, rank, world_size, nbytes):
            raise InvalidArgument("CommitShard does not match its BeginSave (job/step/rank/world_size/nbytes)")
        expected_chunk = self.cfg.memory.chunk_bytes
        if client_crcs and (chunk_bytes != expected_chunk
                            or len(client_crcs) != chunk_count(nbytes, expected_chunk)):
            raise InvalidArgument(f"chunk_crc32c must cover {nbytes} bytes in chunks of {expected_chunk}")
        try:
            validate_tensors(tensors, nbytes)
            tree = parse_tree(tree_json, len(tensors))
        except ValueError as exc:
            raise InvalidArgument(f"bad shard layout: {exc}") from None
        del self.save_leases[lease_id]
        st = self.catalog.ensure(job, step, world_size)
        if not st.shards:
            st.node_ranks = lease.node_ranks
        if st.state(TierName.MEMORY) == TierState.SKIPPED and not st.in_memory:
            lease.slot.content = None
            await self.pool.release_write(lease.slot)
            raise BudgetExhausted(f"step {step} of {job!r} was skipped: {st.tiers[TierName.MEMORY][1]}")
        entry = ShardEntry(rank, nbytes, expected_chunk, (), tuple(tensors), tree)
        rec = ShardRecord(job, step, entry, lease.slot, checksummed=False, recorded=False)
        st.shards[rank] = rec
        lease.slot.content = rec
        lease.slot.writing = False
        await self.catalog.set_tier(st, TierName.MEMORY, TierState.IN_PROGRESS)
        metrics.SAVES_TOTAL.labels("staged").inc()
        metrics.TIER_WRITTEN_BYTES.labels("memory").inc(nbytes)
        if 0 < client_stall_s < 86400:
            metrics.SAVE_BLOCKING_SECONDS.observe(client_stall_s)
        self._spawn(self._checksum(st, rec, client_crcs), f"crc-{job}-{step}-{rank}")
        return Level.STAGED

    async def _checksum(self, st: StepState, rec: ShardRecord, client_crcs: list[int]) -> None:
        """Checksum a freshly staged slot off the hot path; verify the client's sums if sent."""
        slot = rec.slot
        assert slot is not None
        loop = asyncio.get_running_loop()
        slot.readers += 1
        try:
            # Record the committed slot first ("crc pending"): from here on a daemon crash keeps
            # it (the next daemon checksums it at adoption), and the disk drain may start while
            # the crc pass below runs. A slot that never got CommitShard never gets a sidecar.
            await loop.run_in_executor(self.executor, self.pool.write_sidecar, slot, sidecar_meta(st, rec))
            rec.recorded = True
            if st.staged_in_slots:
                self.drainer.kick()  # the disk write overlaps the checksum pass
            entry = rec.entry
            crcs = await loop.run_in_executor(
                self.executor, chunk_crcs, slot.view(entry.nbytes), entry.chunk_bytes)
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
            await self.pool.unpin(slot)
        if st.in_memory:
            log.info("step %s@%d STAGED on all %d ranks", st.job, st.step, st.world_size)
            await self.catalog.set_tier(st, TierName.MEMORY, TierState.COMMITTED)
            metrics.LAST_COMMITTED_STEP.labels(st.job, "memory").set(st.step)
            await self.pool.notify()
            self.drainer.kick()
            if self.uploader is not None:
                self.uploader.kick()
            if self.replicator is not None:
                self.replicator.kick()
        else:
            await self.catalog.notify()

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
        lease = self.save_leases.get(lease_id)
        if lease is None:
            raise NotFound(f"unknown or expired save lease {lease_id[:16]!r}")
        await self._drop_save_lease(lease)

    # -- queries ----------------------------------------------------------------------------
    def step_status(self, job: str, step: int) -> StepState:
        try:
            validate_job(job)
            validate_step(step)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return self.catalog.require(job, step)

    async def wait_step(self, job: str, step: int, level: Level, timeout_s: float) -> StepState:
        self.step_status(job, step)
        if LEVEL_TIER[level].value not in self.status()["tiers"]:
            raise FailedPrecondition(f"{level.name} needs the {LEVEL_TIER[level].value} tier, "
                                     "which this daemon does not run")
        return await self.catalog.wait_level(job, step, level, timeout_s)

    def list_steps(self, job: str) -> list[StepState]:
        try:
            validate_job(job)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if job not in self.catalog.jobs:
            raise NotFound(f"unknown job {job!r}")
        return [s for s in self.catalog.steps(job) if s.shards or s.tiers]

    def list_jobs(self) -> list[str]:
        return sorted(j for j, steps in self.catalog.jobs.items() if steps)

    async def get_manifest(self, job: str, step: int | None) -> tuple[Manifest, list[str]]:
        if step is None:
            step = await self.restorer.latest(job)
        st = self.step_status(job, step)
        tiers = [t.value for t in TierName if st.effective(t)[0] == TierState.COMMITTED]
        if st.in_memory:
            return st.manifest(), tiers
        if self.disk is not None and st.state(TierName.DISK) == TierState.COMMITTED:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self.disk.read_manifest, job, step), tiers
        raise NotFound(f"step {step} of {job!r} is not committed at any tier")

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "root": str(self.cfg.daemon.root),
            "shm_dir": str(self.cfg.shm_path),
            "budget_bytes": self.pool.budget_bytes,
            "slot_bytes_in_use": self.pool.bytes_in_use,
            "slots": len(self.pool.slots),
            "slots_busy": sum(1 for s in self.pool.slots.values() if s.writing or s.readers > 0),
            "draining": self.draining,
            "tiers": ["memory"] + (["disk"] if self.disk is not None else [])
            + (["object"] if self.object is not None else [])
            + (["peer"] if self.replicator is not None else []),
        }

    # -- restore ----------------------------------------------------------------------------
    async def prepare_restore(self, job: str, rank: int, world_size: int, step: int | None,
                              dry_run: bool, client_pid: int) -> tuple[RestoreResult, str]:
        _check_ids(job, 0 if step is None else step, rank, world_size)
        result = await self.restorer.plan(job, rank, world_size, step)
        if dry_run:
            return result, ""
        await self._drop_partial_steps_after(job, result.step)
        result = await self.restorer.execute(job, rank, world_size, result)
        return result, self._lease_restore(result, client_pid)

    def _lease_restore(self, result: RestoreResult, client_pid: int) -> str:
        assert result.slot is not None
        lease = RestoreLease(uuid.uuid4().hex, result.slot,
                             client_pid if client_pid > 0 and _pid_alive(client_pid) else 0,
                             time.monotonic() + self.cfg.memory.lease_timeout_s)
        self.restore_leases[lease.lease_id] = lease
        return lease.lease_id

    async def restore_stream(self, job: str, rank: int, world_size: int, step: int | None,
                             client_pid: int) -> AsyncIterator[tuple[RestoreEvent, RestoreResult, str]]:
        """A restore whose progress is streamed (ckptd/restore_stream.py): yields each event with
        the result so far; the last is "done" with the lease id, or an error is raised."""
        _check_ids(job, 0 if step is None else step, rank, world_size)
        result = await self.restorer.plan(job, rank, world_size, step)
        await self._drop_partial_steps_after(job, result.step)
        progress = RestoreProgress()
        task = asyncio.create_task(self.restorer.execute(job, rank, world_size, result, progress),
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

    async def _drop_partial_steps_after(self, job: str, step: int) -> None:
        """A restore to ``step`` starts a new incarnation of the job: shards of later steps that
        never completed belong to the dead one and must not mix with the new run's shards."""
        for st in self.catalog.steps(job):
            if st.step <= step or st.in_memory or st.state(TierName.DISK) == TierState.COMMITTED:
                continue
            if any((lease.job, lease.step) == (job, st.step) for lease in self.save_leases.values()):
                continue
            for rec in st.shards.values():
                if rec.slot is not None and rec.slot.content is rec:
                    rec.slot.content = None
                    await asyncio.get_running_loop().run_in_executor(
                        self.executor, rec.slot.meta_path.unlink, True)
            log.info("dropping partial step %s@%d (%d of %d shards) left by an earlier run",
                     job, st.step, len(st.shards), st.world_size)
            self.catalog.forget(job, st.step)
        await self.pool.notify()

    async def release_restore(self, lease_id: str) -> None:
        lease = self.restore_leases.pop(lease_id, None)
        if lease is None:
            raise NotFound(f"unknown or expired restore lease {lease_id[:16]!r}")
        await self._release_restore_slot(lease.slot)

    async def _release_restore_slot(self, slot: Slot) -> None:
        await self.pool.unpin(slot)
        if slot.content is None and slot.readers == 0:
            await self.pool.free(slot)

    # -- retention by hand: ckptctl rm, pin/unpin, gc (ckptd/admin.py) ----------------------
    def _init_admin(self) -> StepAdmin:
        from ckptd.admin import StepAdmin  # loads {root}/pins; hands them to disk/object retention

        return StepAdmin(self)

    def pinned_steps(self, job: str) -> set[int]:
        return self.admin.pins.get(job)

    async def delete_step(self, job: str, step: int, tier: str, force: bool, dry_run: bool) -> AdminResult:
        return await self.admin.delete_step(job, step, tier, force, dry_run)

    async def pin_step(self, job: str, step: int, pinned: bool) -> list[int]:
        return await self.admin.pin_step(job, step, pinned)

    async def run_retention(self, job: str, tier: str, dry_run: bool) -> AdminResult:
        return await self.admin.run_retention(job, tier, dry_run)


def socket_dir_ready(path: Path) -> None:
    """Create the socket's directory (0700) and remove a stale socket file (we hold the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_socket():
        path.unlink()
