"""SlotPool.start_spares, the daemon side of PrepareSave, on a real pool of /dev/shm files.

A lease that arrives while its owner's slots are being made takes the slot being made, under the
skip policy too (before, a skip lease grew the pool beside the spare, or was refused when the
budget's room was reserved for it); the spares stop at their target and at the budget.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ckptd.memory.slots import SlotPool

MiB = 1 << 20


def test_a_skip_lease_takes_the_slot_being_made(shm_dir: Path) -> None:
    async def run() -> None:
        pool = SlotPool(shm_dir, 9 * MiB)  # room for one 8 MiB slot, not two
        pool.scan()
        owner = ("j", 0)
        task = pool.start_spares(owner, 8 * MiB, 3)
        assert task is not None and pool.bytes_in_use == 0  # not started yet: the lease comes first
        slot = await pool.lease(owner, 8 * MiB, lambda s: s.content is None, wait=False, timeout_s=10.0,
                                max_slots_per_owner=3)
        await task
        assert slot.writing and slot.capacity == 8 * MiB and list(pool.slots.values()) == [slot]
        assert pool.start_spares(owner, 8 * MiB, 3) is None  # no free room: nothing more to make
        await pool.stop()
        pool.close()

    asyncio.run(run())


def test_spares_stop_at_their_target(shm_dir: Path) -> None:
    async def run() -> None:
        pool = SlotPool(shm_dir, 64 * MiB)
        pool.scan()
        task = pool.start_spares(("j", 0), 2 * MiB, 2)
        assert task is not None and pool.start_spares(("j", 0), 2 * MiB, 2) is task  # one task per owner
        await task
        assert len(pool.slots) == 2 and not any(s.fresh or s.writing for s in pool.slots.values())
        assert pool.start_spares(("j", 0), 2 * MiB, 2) is None
        pool.close()

    asyncio.run(run())


def test_a_slot_being_made_by_a_lease_counts_against_the_budget(shm_dir: Path) -> None:
    async def run() -> None:
        pool = SlotPool(shm_dir, 9 * MiB)  # room for one 8 MiB slot
        pool.scan()
        lease = asyncio.create_task(pool.lease(("a", 0), 8 * MiB, lambda s: s.content is None, wait=False,
                                               timeout_s=10.0, max_slots_per_owner=3))
        for _ in range(20):  # until the lease is making its slot off the loop
            if pool.bytes_in_use:
                break
            await asyncio.sleep(0)
        assert pool.bytes_in_use == 8 * MiB
        assert pool.start_spares(("b", 0), 8 * MiB, 1) is None  # before, it made a second slot: 16 MiB > 9
        await lease
        await pool.stop()
        assert sum(s.capacity for s in pool.slots.values()) == 8 * MiB
        pool.close()

    asyncio.run(run())
