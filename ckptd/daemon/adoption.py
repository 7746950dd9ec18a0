"""Start-up adoption: what a new daemon takes over from the disk, shared memory and the object store.

Functions handed exactly the parts they work on, called by the daemon's ``start`` in order after
the disk tier's recovery: ``catalog_disk`` (committed disk manifests into the catalog),
``adopt_slots`` (surviving shm slots, replicas included), ``prepare_object_tier`` (stale multipart
uploads aborted, create-only puts probed).

Invariants: a slot is re-adopted only if its sidecar parses, its shard fits the slot and every
chunk's crc32c verifies; a slot committed before its crc pass ("crc pending") is checksummed now;
a slot that conflicts with the catalog (other world size, rank already held) or fails any check
is freed, never served. A replica held for another node is re-adopted only while peer
replication is on. A bad disk manifest or an unreachable object store is reported, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from ckptd.core.errors import CkptdError
from ckptd.core.integrity import chunk_crcs, first_bad_chunk
from ckptd.core.manifest import Manifest
from ckptd.core.types import TierName, validate_incarnation, validate_node_ranks
from ckptd.memory.catalog import Catalog, ShardRecord, TierState, entry_from_sidecar
from ckptd.memory.slots import Slot, SlotPool

if TYPE_CHECKING:
    from ckptd.peers.replicas import SlotReplicaStore
    from ckptd.tiers.disk import DiskTier
    from ckptd.tiers.object import ObjectTier

log = logging.getLogger("ckptd.daemon")  # the daemon's logger: operators filter on it


async def catalog_disk(catalog: Catalog, disk: DiskTier, executor: Executor) -> None:
    """Catalog every step whose manifest is committed on disk (after the disk tier's recovery)."""
    loop = asyncio.get_running_loop()
    for job in await loop.run_in_executor(executor, disk.list_jobs):
        for step in await loop.run_in_executor(executor, disk.list_committed, job):
            try:
                m: Manifest = await loop.run_in_executor(
                    executor, disk.read_manifest, job, step)
            except Exception as exc:  # noqa: BLE001 - a bad manifest is reported, not fatal
                log.error("ignoring %s@%d on disk: %s", job, step, exc)
                continue
            st = catalog.ensure(job, step, m.world_size)
            st.created_unix_s = m.created_unix_s
            st.extra = dict(m.extra)
            st.node_ranks = m.node_ranks
            st.manifest_nbytes = m.nbytes
            st.tiers[TierName.DISK] = (TierState.COMMITTED, "")
            # not in memory unless a slot of it is re-adopted below (then COMMITTED again)
            st.tiers.setdefault(TierName.MEMORY, (TierState.REMOVED, "not in memory (catalogued from disk)"))


async def adopt_slots(catalog: Catalog, pool: SlotPool, executor: Executor,
                      replicas: SlotReplicaStore | None) -> None:
    """Re-adopt the shm slots a previous daemon left, if their bytes verify; free the rest."""
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(executor, pool.scan)
    for slot, meta in found:
        if meta.get("crc_pending"):  # committed, daemon died before its crc pass: do it now
            try:
                n = int(meta["shard"]["nbytes"])
                if not 0 <= n <= slot.capacity:
                    raise ValueError("bad size")
                meta["shard"]["chunk_crc32c"] = await loop.run_in_executor(
                    executor, chunk_crcs, slot.view(n), int(meta["shard"]["chunk_bytes"]))
                await loop.run_in_executor(executor, pool.write_sidecar, slot,
                                           {k: v for k, v in meta.items() if k != "crc_pending"})
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("removing slot %s: bad pending sidecar: %s", slot.path.name, exc)
                await pool.free(slot)
                continue
        try:
            job, step, world_size, created, entry = entry_from_sidecar(meta)
            if entry.nbytes > slot.capacity:
                raise ValueError("shard larger than its slot")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("removing slot %s: bad sidecar: %s", slot.path.name, exc)
            await pool.free(slot)
            continue
        bad = await loop.run_in_executor(
            executor, first_bad_chunk, slot.view(entry.nbytes), entry.chunk_bytes,
            entry.chunk_crc32c)
        if meta.get("replica_of"):
            await adopt_replica(pool, replicas, slot, meta, bad is None)
            continue
        st = catalog.ensure(job, step, world_size)
        existing = st.shards.get(entry.rank)
        if bad is not None or st.world_size != world_size or (
            existing is not None and existing.slot is not None
        ):
            log.warning("removing slot %s of %s@%d rank %d (%s)", slot.path.name, job, step,
                        entry.rank, "crc32c mismatch" if bad is not None else "conflict")
            await pool.free(slot)
            continue
        st.created_unix_s = created
        st.extra = dict(meta.get("extra") or {})
        st.node_ranks = validate_node_ranks(list(meta.get("node_ranks") or []), world_size)
        rec = ShardRecord(job, step, entry, slot)
        _writer_from_sidecar(rec, meta.get("writer"))
        slot.content = rec
        slot.owner = (job, entry.rank)
        st.shards[entry.rank] = rec
        log.info("re-adopted slot of %s@%d rank %d from shared memory", job, step, entry.rank)
    for steps in catalog.jobs.values():
        on_disk = [st.step for st in steps.values() if st.state(TierName.DISK) == TierState.COMMITTED]
        for st in steps.values():
            if st.in_memory:
                st.tiers[TierName.MEMORY] = (TierState.COMMITTED, "recovered from shm")
                if on_disk and st.step < max(on_disk) and st.state(TierName.DISK) == TierState.PENDING:
                    # the drain had superseded it before the restart: a newer step is on disk
                    st.tiers[TierName.DISK] = (TierState.SKIPPED, f"superseded by step {max(on_disk)}")


async def adopt_replica(pool: SlotPool, replicas: SlotReplicaStore | None, slot: Slot, meta: dict[str, Any],
                        valid: bool) -> None:
    """Re-adopt a replica held for another node, if its bytes verify and peers are on."""
    from ckptd.core.manifest import ReplicaHeader

    try:
        if not valid or replicas is None:
            raise ValueError("crc32c mismatch" if not valid else "peer replication is off")
        job, step, world_size, created, entry = entry_from_sidecar(meta)
        header = ReplicaHeader(job, step, world_size, entry, str(meta["replica_of"]),
                               tuple(meta.get("node_ranks") or ()), created, dict(meta.get("extra") or {}))
        header.validate()
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("removing replica slot %s: %s", slot.path.name, exc)
        await pool.free(slot)
        return
    replicas.adopt_sidecar(slot, meta, header)
    log.info("re-adopted replica of %s@%d rank %d (from %s)", header.job, header.step, header.rank,
             header.source_node)


async def prepare_object_tier(obj: ObjectTier, executor: Executor) -> None:
    """Abort stale multipart uploads and probe create-only puts; a store that is down at
    start-up is reported, not fatal (uploads retry when it returns)."""
    loop = asyncio.get_running_loop()
    try:
        aborted = await loop.run_in_executor(
            executor, obj.cleanup_incomplete, obj.stale_upload_age_s)
        for key, _ in aborted:
            log.info("aborted stale multipart upload of %s", key)
        await loop.run_in_executor(executor, obj.conditional_put_supported)
    except CkptdError as exc:
        log.error("object tier not reachable at start-up: %s", exc)


def _writer_from_sidecar(rec: ShardRecord, writer: Any) -> None:
    """Who wrote a re-adopted shard (its incarnation and pid), if the sidecar says."""
    if not isinstance(writer, dict):
        return
    try:
        rec.writer = validate_incarnation(str(writer.get("incarnation") or ""))
        rec.writer_pid = max(0, int(writer.get("pid") or 0))
    except (TypeError, ValueError):
        rec.writer, rec.writer_pid = "", 0  # unknown: never dropped for its writer
