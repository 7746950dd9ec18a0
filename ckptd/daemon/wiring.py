"""The daemon's wiring: where the parts are built, handed their collaborators, started and stopped.

``Daemon`` builds, in dependency order, the slot pool and catalog (memory tier), the disk and
object tiers, the peer membership, the restorer, the drains (disk drain, upload), the save path,
the restore service, the step queries and the step admin, handing each exactly what it uses; it
keeps them as public attributes for the servers that adapt them (ckptd/daemon/serve.py). Nothing
it builds holds a reference back to it, and it forwards no calls: its own code is the life cycle
and the status report.

Life cycle: ``start()`` takes the single-instance lock on the root, recovers the disk tier (temp
and uncommitted step directories removed, committed manifests catalogued), re-adopts surviving
shm slots whose checksums verify, then starts the drainer, the uploader, the replicator, restore
slot preparation and the lease reaper. ``stop()`` refuses new saves, lets shards already
acknowledged STAGED finish their checksum, finishes pending disk commits (and uploads) within the
shutdown deadline and stops every task; ``close()`` then releases the executor, the mappings and
the lock. One daemon serves a root at a time (the lock); every background task is owned here or
by a part built here, and is awaited or cancelled by ``stop()``.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ckptd import __version__
from ckptd.core import fsops, metrics
from ckptd.core.config import Config
from ckptd.core.errors import FailedPrecondition
from ckptd.core.layout_memo import LayoutMemo
from ckptd.daemon import adoption
from ckptd.drains import retention_record
from ckptd.drains.admin import StepAdmin
from ckptd.drains.disk_drain import DiskDrainer
from ckptd.drains.pins import PINS_DIRNAME, PinStore
from ckptd.drains.tasks import Shutdown, TaskSet
from ckptd.memory import release
from ckptd.memory.catalog import Catalog
from ckptd.memory.slots import SlotPool
from ckptd.restore.planner import Restorer
from ckptd.restore.queries import StepQueries
from ckptd.restore.service import RestoreService
from ckptd.restore.sources.base import RestoreSource
from ckptd.restore.sources.disk import DiskSource
from ckptd.restore.sources.memory import MemorySource
from ckptd.restore.sources.object import ObjectSource
from ckptd.restore.sources.peer import PeerSource
from ckptd.save.service import SavePath
from ckptd.tiers.disk import DiskTier

if TYPE_CHECKING:
    from ckptd.drains.upload import ObjectUploader
    from ckptd.peers.membership import Membership
    from ckptd.peers.replicas import SlotReplicaStore
    from ckptd.restore.prep import RestorePrep
    from ckptd.tiers.object import ObjectTier

log = logging.getLogger("ckptd.daemon")
LEASE_REAP_INTERVAL_S = 0.5


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.executor = ThreadPoolExecutor(cfg.daemon.io_threads, thread_name_prefix="ckptd-io")
        self.shutdown = Shutdown()
        self.tasks = TaskSet()  # checksum passes of staged shards
        self.pool = SlotPool(cfg.shm_path, cfg.memory.budget_bytes, cfg.shared_gid)
        self.catalog = Catalog()
        self.pins = PinStore(cfg.daemon.root / PINS_DIRNAME)  # ckptctl pin: every retention keeps them
        self.pins.load()
        self.disk = (
            DiskTier(cfg.daemon.root / "data", cfg.disk.direct_io, cfg.disk.write_block_bytes)
            if cfg.disk.enabled else None
        )
        self.object: ObjectTier | None = None
        self.uploader: ObjectUploader | None = None
        in_upload: dict[str, set[int]] = {}  # steps the uploader reads from disk: disk retention keeps them
        if cfg.object.enabled:
            from ckptd.drains.upload import ObjectUploader  # boto3 is heavy: only when configured
            from ckptd.tiers.object import ObjectTier

            self.object = ObjectTier(cfg.object)
            self.uploader = ObjectUploader(self.catalog, self.pool, self.disk, in_upload, self.object, cfg.object,
                                           self.executor, self.pins.pins)
        self.membership: Membership | None = None
        self.replicas: SlotReplicaStore | None = None
        if cfg.peers.listen:
            self._build_peers()
        m = self.membership
        self.drainer = DiskDrainer(
            self.catalog, self.pool, self.disk, cfg.disk, self.executor, in_upload=in_upload,
            operator_pins=self.pins.pins, on_commit=self.uploader.kick if self.uploader is not None else None,
            across_nodes=m.disk_across_nodes if m is not None else None,
            before_write=m.before_drain if m is not None else None)
        # restore sources, one line each; the planner asks them nearest first (their distance)
        sources: list[RestoreSource] = [MemorySource(self.catalog, self.pool, self.executor)]
        if self.disk is not None:
            sources.append(DiskSource(self.disk, self.catalog, self.executor))
        if m is not None:
            sources.append(PeerSource(lambda: m.directory, self.catalog))
        if self.object is not None:
            sources.append(ObjectSource(self.object, self.catalog, self.executor))
        self.restorer = Restorer(self.catalog, self.pool, self.executor, cfg.memory.wait_timeout_s, sources,
                                 on_adopt=self._after_adopt)
        self.layouts = LayoutMemo()  # one job's layout converted and checked once, not every save
        self.saves = SavePath(self.catalog, self.pool, self.disk, self.executor, cfg.memory, self.tasks,
                              self.shutdown, self.drainer.kick, self._step_staged, self.layouts)
        self.restores = RestoreService(self.catalog, self.pool, self.restorer, self.executor,
                                       cfg.memory.lease_timeout_s, self.saves.retire)
        self.steps = StepQueries(self.catalog, self.restorer, self.disk, self.executor, self.tiers)
        self.admin = StepAdmin(self.catalog, self.pool, self.disk, self.object, self.executor, cfg.disk, cfg.object,
                               self.pins, in_upload, self.saves.saving)
        self.prep: RestorePrep | None = None
        if m is not None and m.directory.addrs and cfg.peers.prepare_restore:
            from ckptd.restore.prep import RestorePrep

            self.prep = RestorePrep(m.directory, self.catalog, self.pool, self.executor, self.restorer.prepared)
        self._lock_fd = -1
        self._reaper: asyncio.Task[None] | None = None
        metrics.SHM_BUDGET_BYTES.set(cfg.memory.budget_bytes)
        metrics.SHM_BYTES_IN_USE.set_function(lambda: self.pool.bytes_in_use)
        metrics.INFLIGHT.labels("copying").set_function(lambda: len(self.saves.leases))

    def _build_peers(self) -> None:
        """Peer replication: this node's membership (directory, replicator) and its replica store."""
        from functools import partial

        from ckptd.core.config.peers import load_token, members, node_id, parse_discovery, tls_files
        from ckptd.peers.client import PeerClient
        from ckptd.peers.discovery import PeerDiscovery
        from ckptd.peers.membership import Membership
        from ckptd.peers.replicas import SlotReplicaStore
        from ckptd.peers.replicator import PeerDirectory

        p = self.cfg.peers
        me = node_id(p)
        client = PeerClient(load_token(p), me, chunk_bytes=p.chunk_bytes, max_inflight_bytes=p.max_inflight_bytes,
                            max_attempts=p.max_attempts, tls=tls_files(p))
        static = members(p, os.environ)
        directory = PeerDirectory(me, static, client, p.replication_factor, p.push_timeout_s, p.fetch_timeout_s,
                                  p.commit_timeout_s)
        if p.discovery and static:
            raise FailedPrecondition("peers.discovery and CKPTD_PEERS are exclusive: unset one")
        self.membership = Membership(directory, bool(static), p.replication_factor, self.catalog, self.pool,
                                     self.shutdown, p.drain_wait_s, p.advertise or p.listen, p.failure_domain,
                                     partial(PeerDiscovery, parse_discovery(p.discovery), client,
                                             p.discovery_interval_s) if p.discovery else None)
        self.replicas = SlotReplicaStore(self.catalog, self.pool, self.disk, self.executor, self.cfg, me)

    def _step_staged(self) -> None:
        """A step is complete in memory: every drain may have work."""
        self.drainer.kick()
        if self.uploader is not None:
            self.uploader.kick()
        if self.membership is not None:
            self.membership.kick()

    def _after_adopt(self) -> None:
        """A restore put a step back in memory: re-warm the disk, top up its replicas."""
        self.drainer.kick()
        if self.membership is not None:
            self.membership.kick()

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
            await adoption.catalog_disk(self.catalog, self.disk, self.executor)
        await adoption.adopt_slots(self.catalog, self.pool, self.executor, self.replicas)
        if self.replicas is not None:
            await self.replicas.load_disk()
        if self.object is not None:
            await adoption.prepare_object_tier(self.object, self.executor)
        self.drainer.start()
        if self.uploader is not None:
            self.uploader.start()
        if self.membership is not None:
            self.membership.start()
        if self.prep is not None:
            self.prep.start()
        self._reaper = asyncio.create_task(self._reap_leases(), name="lease-reaper")

    async def _reap_leases(self) -> None:
        """Drop save and restore leases whose client died or whose deadline passed."""
        while True:
            await asyncio.sleep(LEASE_REAP_INTERVAL_S)
            await self.saves.reap_expired()
            await self.restores.reap_expired()

    async def stop(self) -> bool:
        """Graceful stop; True when every pending disk commit finished."""
        timeout_s = self.cfg.daemon.shutdown_timeout_s
        self.shutdown.draining = True
        await self.catalog.notify()  # a drain waiting for a push (Membership.before_drain) goes ahead
        # Shards already acknowledged STAGED may still be checksumming: let them finish (sidecar
        # written, step committed in memory, drainer kicked) so the drain below includes them.
        await self.tasks.wait(timeout_s)
        if self.membership is not None:  # best effort at shutdown; disk durability is not
            await self.membership.stop_replication(min(5.0, timeout_s))
        if self.replicas is not None:  # replicas being written to disk (peers.store_on_disk)
            await self.replicas.stop(timeout_s)
        clean = await self.drainer.stop(timeout_s)
        await self.pool.stop()
        if self.uploader is not None:
            clean = await self.uploader.stop(timeout_s) and clean
        await self.tasks.cancel()
        if self.membership is not None:
            await self.membership.cancel_commits()
        if self.prep is not None:
            await self.prep.stop()
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
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

    # -- status -----------------------------------------------------------------------------
    def tiers(self) -> list[str]:
        """The tiers this daemon runs now (the peer tier once it has peers to replicate to)."""
        return (["memory"] + (["disk"] if self.disk is not None else [])
                + (["object"] if self.object is not None else [])
                + (["peer"] if self.membership is not None and self.membership.replicator is not None else []))

    def status(self) -> dict[str, Any]:
        m = self.membership
        node_id, peer_address = m.identity() if m is not None else ("", "")
        return {
            "version": __version__,
            "root": str(self.cfg.daemon.root),
            "shm_dir": str(self.cfg.shm_path),
            "budget_bytes": self.pool.budget_bytes,
            "slot_bytes_in_use": self.pool.bytes_in_use,
            "slots": len(self.pool.slots),
            "slots_busy": sum(1 for s in self.pool.slots.values() if s.writing or s.readers > 0),
            "node_id": node_id,
            "peer_address": peer_address,
            "failure_domain": m.failure_domain if m is not None else "",
            "preparing_restore": self.prep is not None and self.prep.running,
            "restore_slots_prepared": self.prep.count if self.prep is not None else 0,
            "restore_slots": [{"job": job, "rank": rank, "slot_path": str(slot.path), "capacity_bytes": slot.capacity,
                               "prepared": step is None, "step": step or 0}
                              for job, rank, slot, step in self.restorer.restore_slots()],
            "save_slots": [{"job": s.owner[0], "rank": s.owner[1], "slot_path": str(s.path),
                            "capacity_bytes": s.capacity} for s in self.pool.slots.values() if s.owner is not None],
            "draining": self.shutdown.draining,
            "tiers": self.tiers(),
        }

