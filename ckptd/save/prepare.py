"""PrepareSave: make a rank's save slots before its first save, so that save copies at steady speed.

A first save into a new slot pays for the slot's memory: the daemon's posix_fallocate, the first
fault of every page (tmpfs zeroes it then; on a VM whose freed memory went back to the host, the
host faults it in as well), and the client's page tables (docs/architecture.md, "Where the time
goes"). ``prepare_save`` has the pool make the rank's slots for a shard of ``nbytes`` ahead of
need (``SlotPool.start_spares``: fallocate'd and faulted in by the daemon, one after another,
out of the budget's free room) and answers once they are made; the client maps them in the
background (ckptd_client/save/prep.py), so its first save only copies.

Invariants: never more slots than the rank's saves use (``memory.slots_per_rank``); never evicts
(a budget without free room prepares fewer, possibly none, and the save path makes room as
usual); a save that arrives meanwhile takes the slot being made instead of making another
(``SlotPool.lease``); a cancelled call leaves the slots being made to the pool, which owns them
as it owns spares (free, reusable, evictable). A shard larger than the whole budget is
BudgetExhausted; a malformed request is InvalidArgument and changes nothing.
"""

from __future__ import annotations

import asyncio

from ckptd.core.errors import BudgetExhausted, DaemonUnavailable, InvalidArgument
from ckptd.memory.slots import Slot, slot_bytes
from ckptd.save.service import SavePath, check_ids


async def prepare_save(saves: SavePath, job: str, rank: int, world_size: int, nbytes: int,
                       slots: int) -> tuple[list[Slot], int]:
    """Make up to ``slots`` (0: ``memory.slots_per_rank``) slots of at least nbytes for (job, rank);
    return the rank's slots that fit nbytes once made, and how many were wanted."""
    if saves.shutdown.draining:
        raise DaemonUnavailable("daemon is draining for shutdown; not preparing saves")
    check_ids(job, 0, rank, world_size)
    mem = saves.memory
    if not 0 <= nbytes <= mem.max_shard_bytes:
        raise InvalidArgument(f"nbytes {nbytes} out of range [0, {mem.max_shard_bytes}] (memory.max_shard_bytes)")
    if not 0 <= slots <= mem.slots_per_rank:
        raise InvalidArgument(f"slots {slots} out of range [0, {mem.slots_per_rank}] (memory.slots_per_rank; "
                              "0: as many as the rank's saves use)")
    wanted = slots or mem.slots_per_rank
    pool = saves.pool
    need = slot_bytes(nbytes)
    if need > pool.budget_bytes:
        raise BudgetExhausted(f"a shard of {nbytes} bytes does not fit the shm budget of {pool.budget_bytes} "
                              "bytes (memory.budget_bytes)")
    owner = (job, rank)
    for _ in range(2):  # a task already at the owner's slots (a save's spares) may make another size
        task = pool.start_spares(owner, need, wanted)
        if task is None:
            break
        await asyncio.shield(task)  # a cancelled call leaves the task to the pool
    return [s for s in pool.slots.values() if s.owner == owner and s.capacity >= nbytes], wanted


__all__ = ["prepare_save"]
