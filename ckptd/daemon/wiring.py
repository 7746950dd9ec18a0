"""The daemon core: owns the slot pool, the catalog, the tiers and every background task.

``Daemon`` is transport-free: ``server.py`` (and ``admin.py`` for ckptctl) adapt gRPC to its
public methods. It builds the tiers and workers and wires them together, runs the life cycle, and
answers the queries; the save path (save_path.py), start-up adoption (adoption.py) and the restore
entry points (restore_service.py) are their own modules, called through the methods here.

Life cycle: ``start()`` takes the single-instance lock on the root, recovers the disk tier (temp
and uncommitted step directories removed, committed manifests catalogued), re-adopts surviving
shm slots whose checksums verify, then starts the drainer, the uploader, the replicator and the
lease reaper. ``stop()`` refuses new saves, lets shards already acknowledged STAGED finish their
checksum, finishes pending disk commits (and uploads) within the shutdown deadline and stops the
tasks; ``close()`` then releases the executor, the mappings and the lock. One daemon serves a
root at a time (the lock); every background task it spawns is awaited or cancelled by ``stop()``.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd import __version__
from ckptd.core import fsops, metrics
from ckptd.core.config import Config
from ckptd.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest
from ckptd.daemon import adoption, instance
from ckptd.drains import retention_record
from ckptd.drains.disk_drain import DiskDrainer
from ckptd.memory import release
from ckptd.memory.catalog import Catalog, StepState, TierState
from ckptd.memory.slots import SlotPool
from ckptd.restore.planner import Restorer, RestoreResult
from ckptd.restore.service import RestoreLease, RestoreService
from ckptd.restore.stream import RestoreEvent
from ckptd.save.service import SaveLease, SavePath
from ckptd.tiers.disk import DiskTier

if TYPE_CHECKING:
    from ckptd.drains.admin import AdminResult, StepAdmin
    from ckptd.drains.upload import ObjectUploader
    from ckptd.peers.replicas import SlotReplicaStore
    from ckptd.peers.replicator import PeerDirectory, Replicator
    from ckptd.tiers.object import ObjectTier

from ckptd.core.types import LEVEL_TIER, Level, TierName, validate_job, validate_step

log = logging.getLogger("ckptd.daemon")


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.executor = ThreadPoolExecutor(cfg.daemon.io_threads, thread_name_prefix="ckptd-io")
        self.pool = SlotPool(cfg.shm_path, cfg.memory.budget_bytes, cfg.shared_gid)
        self.catalog = Catalog()
        self.disk = (
            DiskTier(cfg.daemon.root / "data", cfg.disk.direct_io, cfg.disk.write_block_bytes)
            if cfg.disk.enabled else None
        )
        self.drainer = DiskDrainer(self.catalog, self.pool, self.disk, cfg.disk, self.executor)
        self.object: ObjectTier | None = None
        self.uploader: ObjectUploader | None = None
        if cfg.object.enabled:
            from ckptd.drains.upload import ObjectUploader
            from ckptd.tiers.object import ObjectTier  # boto3 is heavy: only when configured

            self.object = ObjectTier(cfg.object)
            self.uploader = ObjectUploader(self.catalog, self.pool, self.disk, self.drainer, self.object,
                                           cfg.object, self.executor)
            self.drainer.on_commit = self.uploader.kick
        self.restorer = Restorer(self.catalog, self.pool, self.disk, self.executor,
                                 cfg.memory.wait_timeout_s, self.object)
        self.restorer.on_adopt = self.drainer.kick
        self.peers: PeerDirectory | None = None
        self.static_membership = False
        self.replicas: SlotReplicaStore | None = None
        self.replicator: Replicator | None = None
        if cfg.peers.listen:
            self._init_peers()
        self.saves = SavePath(self)  # owns the save leases
        self.restores = RestoreService(self)  # owns the restore leases
        self.draining = False
        self._lock_fd = -1
        self._tasks: set[asyncio.Task[None]] = set()
        self._across: set[asyncio.Task[None]] = set()  # cross-node commits: cancelled at stop
        self._reaper: asyncio.Task[None] | None = None
        self._prep: asyncio.Task[int] | None = None  # restore slots prepared at start (restore_prep.py)
        self.restore_slots_prepared = 0
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
        retention_record.write(self.cfg.daemon.root, self.cfg.disk)  # for ckptctl --root gc
        loop = asyncio.get_running_loop()
        if self.disk is not None:
            removed = await loop.run_in_executor(self.executor, self.disk.recover)
            for path in removed:
                log.info("recovery removed uncommitted %s", path)
            await adoption.catalog_disk(self)
        await adoption.adopt_slots(self)
        if self.replicas is not None:
            await self.replicas.load_disk()
        if self.object is not None:
            await adoption.prepare_object_tier(self)
        self.drainer.start()
        if self.uploader is not None:
            self.uploader.start()
        if self.replicator is not None:
            self.replicator.start()
            self.replicator.kick()
        if self.peers is not None and self.peers.addrs and self.cfg.peers.prepare_restore:
            from ckptd.restore.prep import prepare_restore_slots

            self._prep = asyncio.create_task(prepare_restore_slots(self), name="prepare-restore-slots")
        self._reaper = asyncio.create_task(self.saves.reap_leases(), name="lease-reaper")

    def _init_peers(self) -> None:
        """Peer replication: this node's directory of peers, the replica store, the replicator."""
        from ckptd.core.peer_config import load_token, members, node_id, tls_files
        from ckptd.peers.client import PeerClient
        from ckptd.peers.replicas import SlotReplicaStore
        from ckptd.peers.replicator import PeerDirectory, Replicator

        p = self.cfg.peers
        me = node_id(p)
        client = PeerClient(load_token(p), me, chunk_bytes=p.chunk_bytes, max_inflight_bytes=p.max_inflight_bytes,
                            max_attempts=p.max_attempts, tls=tls_files(p))
        static = members(p, os.environ)
        self.static_membership = bool(static)  # then SetPeers (membership from the job) is refused
        self.peers = PeerDirectory(me, static, client, p.replication_factor, p.push_timeout_s, p.fetch_timeout_s,
                                   p.commit_timeout_s)
        self.replicas = SlotReplicaStore(self.catalog, self.pool, self.disk, self.executor, self.cfg, me)
        if p.replication_factor > 0 and self.peers.addrs:
            self.replicator = Replicator(self.catalog, self.pool, self.peers)
            self.restorer.on_adopt = self._after_adopt
        self.restorer.peers = self.peers
        self.drainer.across_nodes = self._disk_across_nodes
        self.drainer.before_write = self._before_drain

    async def _before_drain(self, st: StepState) -> None:
        """Replication first: a step's disk write waits (at most ``peers.drain_wait_s``) until this
        node's push of it ended. Both read the same slot and, on a node short of cores, a disk
        write beside the push slowed REPLICATED by a third while the write itself gains little
        from starting early (docs/architecture.md, "Replication first")."""
        rep, wait_s = self.replicator, self.cfg.peers.drain_wait_s
        if rep is not None and wait_s > 0:
            await self.catalog.wait_until(lambda: self.draining or rep.push_settled(st), wait_s)

    def _disk_across_nodes(self, st: StepState, ok: bool, reason: str) -> None:
        """LOCAL_DURABLE of a multi-node step is global: report this node's part to the step's
        coordinator and, if it committed, clear the wait once every rank is on some node's disk."""
        from ckptd.peers.replicator import commit_across_nodes
        from ckptd.peers.types import ReadyReport

        assert self.peers is not None
        peers = self.peers
        report = ReadyReport(st.job, st.step, st.world_size, "disk", peers.node_id, st.ranks, not ok, reason[:500])

        async def run() -> None:
            why = await commit_across_nodes(peers, report, peers.commit_timeout_s)
            if not ok:
                return
            if why is None:
                st.across_nodes.pop(TierName.DISK, None)
                log.info("step %s@%d LOCAL_DURABLE on all %d ranks", st.job, st.step, st.world_size)
            else:
                st.across_nodes[TierName.DISK] = why
                log.warning("step %s@%d: LOCAL_DURABLE not reached on every node: %s", st.job, st.step, why)
            await self.catalog.notify()

        task = asyncio.create_task(run(), name=f"disk-across-nodes-{st.job}-{st.step}")
        self._across.add(task)
        task.add_done_callback(self._across.discard)

    def set_peers(self, entries: list[str]) -> list[str]:
        """The job's membership from its clients (SetPeers); replication starts if it had no peers."""
        from ckptd.core.peer_config import parse_peers
        from ckptd.peers.replicator import Replicator

        if self.peers is None:
            raise FailedPrecondition("peer replication is off on this daemon (set peers.listen and a token)")
        if self.static_membership:
            raise FailedPrecondition("this daemon's peers are configured statically (peers.peers or CKPTD_PEERS)")
        addrs = parse_peers(list(entries), "SetPeers.peers")
        if self.peers.node_id not in {a.node_id for a in addrs}:
            raise InvalidArgument(f"SetPeers: the list does not name this node ({self.peers.node_id!r})")
        self.peers.set_members(addrs)
        log.info("peer membership set by the job: %s", ", ".join(f"{a.node_id}={a.target}" for a in addrs))
        if self.replicator is None and self.cfg.peers.replication_factor > 0 and self.peers.addrs:
            self.replicator = Replicator(self.catalog, self.pool, self.peers)
            self.restorer.on_adopt = self._after_adopt
            self.replicator.start()
        if self.replicator is not None:
            self.replicator.kick()
        return sorted(a.node_id for a in addrs)

    def peer_identity(self) -> tuple[str, str]:
        """(node id, address peers dial) of this daemon, or ("", "") when replication is off."""
        if self.peers is None:
            return "", ""
        from ckptd.core.peer_config import split_target_host

        p = self.cfg.peers
        return self.peers.node_id, split_target_host(p.advertise or p.listen)

    def _after_adopt(self) -> None:
        self.drainer.kick()
        if self.replicator is not None:
            self.replicator.kick()  # top up replicas of a restored step

    async def stop(self) -> bool:
        """Graceful stop; True when every pending disk commit finished."""
        self.draining = True
        await self.catalog.notify()  # a drain waiting for a push (_before_drain) goes ahead
        # Shards already acknowledged STAGED may still be checksumming: let them finish (sidecar
        # written, step committed in memory, drainer kicked) so the drain below includes them.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.cfg.daemon.shutdown_timeout_s)
        if self.replicator is not None:  # best effort at shutdown; disk durability is not
            await self.replicator.stop(min(5.0, self.cfg.daemon.shutdown_timeout_s))
        if self.replicas is not None:  # replicas being written to disk (peers.store_on_disk)
            await self.replicas.stop(self.cfg.daemon.shutdown_timeout_s)
        if self.peers is not None:
            await self.peers.client.close()
        clean = await self.drainer.stop(self.cfg.daemon.shutdown_timeout_s)
        await self.pool.stop()
        if self.uploader is not None:
            clean = await self.uploader.stop(self.cfg.daemon.shutdown_timeout_s) and clean
        owned: list[asyncio.Task[Any]] = [*self._tasks, *self._across,
                                          *(t for t in (self._reaper, self._prep) if t is not None)]
        for task in owned:
            task.cancel()
        for task in owned:
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
        release.release_on_exit(self.cfg.shm_path, self.disk.root if self.disk is not None else None,
                                self.cfg.daemon.release_memory_on_exit)  # ckptd/memory/release.py
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- save path (ckptd/save/service.py) -----------------------------------------------------
    @property
    def save_leases(self) -> dict[str, SaveLease]:
        return self.saves.leases

    async def begin_save(self, job: str, step: int, rank: int, world_size: int, nbytes: int,
                         wait: bool | None, wait_timeout_s: float | None, client_pid: int,
                         node_ranks: tuple[int, ...] = ()) -> SaveLease:
        return await self.saves.begin_save(job, step, rank, world_size, nbytes, wait, wait_timeout_s, client_pid,
                                           node_ranks)

    async def commit_shard(self, lease_id: str, job: str, step: int, rank: int, world_size: int,
                           nbytes: int, tensors: list[TensorEntry], tree_json: str,
                           chunk_bytes: int, client_crcs: list[int], client_stall_s: float = 0.0) -> Level:
        return await self.saves.commit_shard(lease_id, job, step, rank, world_size, nbytes, tensors, tree_json,
                                             chunk_bytes, client_crcs, client_stall_s)

    async def abort_save(self, lease_id: str) -> None:
        await self.saves.abort_save(lease_id)

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
            "node_id": self.peer_identity()[0],
            "peer_address": self.peer_identity()[1],
            "failure_domain": self.cfg.peers.failure_domain if self.peers is not None else "",
            "preparing_restore": self._prep is not None and not self._prep.done(),
            "restore_slots_prepared": self.restore_slots_prepared,
            "restore_slots": [{"job": job, "rank": rank, "slot_path": str(slot.path), "capacity_bytes": slot.capacity,
                               "prepared": step is None, "step": step or 0}
                              for job, rank, slot, step in self.restorer.restore_slots()],
            "draining": self.draining,
            "tiers": ["memory"] + (["disk"] if self.disk is not None else [])
            + (["object"] if self.object is not None else [])
            + (["peer"] if self.replicator is not None else []),
        }

    # -- restore ----------------------------------------------------------------------------
    # -- restore (ckptd/restore/service.py) ------------------------------------------------
    @property
    def restore_leases(self) -> dict[str, RestoreLease]:
        return self.restores.leases

    async def prepare_restore(self, job: str, rank: int, world_size: int, step: int | None,
                              dry_run: bool, client_pid: int) -> tuple[RestoreResult, str]:
        return await self.restores.prepare_restore(job, rank, world_size, step, dry_run, client_pid)

    def restore_stream(self, job: str, rank: int, world_size: int, step: int | None,
                       client_pid: int) -> AsyncIterator[tuple[RestoreEvent, RestoreResult, str]]:
        """A restore whose progress is streamed (ckptd/restore/stream.py): yields each event with
        the result so far; the last is "done" with the lease id, or an error is raised."""
        return self.restores.restore_stream(job, rank, world_size, step, client_pid)

    async def release_restore(self, lease_id: str) -> None:
        await self.restores.release_restore(lease_id)

    # -- retention by hand: ckptctl rm, pin/unpin, gc (ckptd/drains/admin.py) ----------------------
    def _init_admin(self) -> StepAdmin:
        from ckptd.drains.admin import StepAdmin  # loads {root}/pins; hands them to disk/object retention

        return StepAdmin(self)

    def pinned_steps(self, job: str) -> set[int]:
        return self.admin.pins.get(job)

    async def delete_step(self, job: str, step: int, tier: str, force: bool, dry_run: bool) -> AdminResult:
        return await self.admin.delete_step(job, step, tier, force, dry_run)

    async def pin_step(self, job: str, step: int, pinned: bool) -> list[int]:
        return await self.admin.pin_step(job, step, pinned)

    async def run_retention(self, job: str, tier: str, dry_run: bool) -> AdminResult:
        return await self.admin.run_retention(job, tier, dry_run)


def socket_dir_ready(path: Path, root: Path | None = None) -> None:
    """Create the socket's directory (0700), claim the socket for this daemon (refused while a live
    daemon serves it) and remove a stale socket file (ckptd/daemon/instance.py)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    instance.claim_socket(path, root)
