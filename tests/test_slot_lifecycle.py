"""A slot is never closed or reused while a reader holds it, and never handed out while it is destroyed.

The race the soak test (tests/fault/test_soak_readers.py) hit now and then: a restore served a
step from its memory slot, the operator removed that memory copy (``ckptctl rm``), the restore was
released, and the daemon destroyed the slot in a worker thread; a save leasing meanwhile took the
very slot being destroyed, its mapping was closed under it and the acknowledged step was lost
("disk tier failed: mmap closed or invalid"). Here the same interleaving is driven through the
daemon's own parts (save path, restore service, memory source, step admin, slot pool) on real
/dev/shm slots; the event loop's worker threads (``asyncio.to_thread``) run through an executor
that holds the destroy until the save had its chance to lease, so the test does not depend on
timing. The soak's other loss under load, a staged step whose slots newer saves reused before
the disk drain got to it (left PENDING, then forgotten), is driven the same way: the drain starts
only after the reuse; and so is the replicator's form of it (the step left PENDING at the peer tier).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.config import DiskSection, MemorySection
from ckptd.core.config.object import ObjectSection
from ckptd.core.errors import BudgetExhausted, NotFound
from ckptd.core.layout import TensorEntry
from ckptd.core.types import Level, TierName
from ckptd.drains.admin import StepAdmin
from ckptd.drains.disk_drain import DiskDrainer
from ckptd.drains.pins import PinStore
from ckptd.drains.tasks import Shutdown, TaskSet
from ckptd.memory.catalog import Catalog, TierState
from ckptd.memory.slots import Slot, SlotPool
from ckptd.restore.planner import Restorer
from ckptd.restore.service import RestoreService
from ckptd.restore.sources.memory import MemorySource
from ckptd.save.service import SaveLease, SavePath
from ckptd.tiers.disk import DiskTier
from tests.state_factory import byte_state

MiB = 1 << 20
JOB = "lifecycle"
N = 64 * 1024  # one shard; its slot is 2 MiB (the slot alignment)
TENSORS = (TensorEntry("w", "uint8", (N,), 0, N),)
TREE = '{"d": [["w", {"t": 0}]]}'


def shard(step: int) -> bytes:
    return bytes(byte_state(step, N)["w"].tobytes())


class HeldExecutor(ThreadPoolExecutor):
    """The loop's default executor (``asyncio.to_thread``); ``hold_next`` makes it hold the next
    job it is given until ``go`` is set (``held`` is set once that job is waiting)."""

    def __init__(self) -> None:
        super().__init__(4, thread_name_prefix="held")
        self.armed = False
        self.held = threading.Event()
        self.go = threading.Event()

    def hold_next(self) -> None:
        self.armed = True

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if not self.armed:
            return super().submit(fn, *args, **kwargs)
        self.armed = False

        def gated() -> Any:
            self.held.set()
            self.go.wait(30)
            return fn(*args, **kwargs)

        return super().submit(gated)


@dataclass
class Parts:
    catalog: Catalog
    pool: SlotPool
    saves: SavePath
    restores: RestoreService
    admin: StepAdmin


def build(shm_dir: Path, pins_dir: Path, executor: ThreadPoolExecutor, disk: DiskTier | None = None) -> Parts:
    """The daemon's parts as its wiring builds them (no drain running): one rank, two slots of 2 MiB."""
    mem = MemorySection(budget_bytes=4 * MiB, slots_per_rank=2, wait_timeout_s=10.0)
    catalog, pool = Catalog(), SlotPool(shm_dir, mem.budget_bytes)
    pool.scan()
    saves = SavePath(catalog, pool, disk, executor, mem, TaskSet(), Shutdown(), lambda: None, lambda: None)
    restorer = Restorer(catalog, pool, executor, mem.wait_timeout_s, [MemorySource(catalog, pool, executor)])
    restores = RestoreService(catalog, pool, restorer, executor, mem.lease_timeout_s)
    admin = StepAdmin(catalog, pool, disk, None, executor, DiskSection(), ObjectSection(), PinStore(pins_dir), {},
                      saves.saving)
    return Parts(catalog, pool, saves, restores, admin)


async def begin(p: Parts, step: int) -> SaveLease:
    return await p.saves.begin_save(JOB, step, 0, 1, N, True, 10.0, 0)


async def commit(p: Parts, lease: SaveLease) -> Slot:
    """Copy the step's bytes into the leased slot (as the client does) and commit them, STAGED."""
    lease.slot.mm[:N] = shard(lease.step)
    await p.saves.commit_shard(lease.lease_id, JOB, lease.step, 0, 1, N, TENSORS, TREE, 16 * 1024, [])
    await p.catalog.wait_level(JOB, lease.step, Level.STAGED, 10.0)
    return lease.slot


def test_a_restore_released_after_rm_never_hands_its_slot_to_a_save(shm_dir: Path, tmp_path: Path) -> None:
    threads, io = HeldExecutor(), ThreadPoolExecutor(2)

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(threads)
        p = build(shm_dir, tmp_path / "pins", io)
        slot0 = await commit(p, await begin(p, 0))
        await p.pool.stop()  # the rank's second slot, made in the background, is there
        await commit(p, await begin(p, 1))
        assert len(p.pool.slots) == 2 and p.pool.bytes_in_use == 4 * MiB

        # A reader restores step 0 from its memory slot, and the operator removes that copy meanwhile.
        result, lease_id = await p.restores.prepare_restore(JOB, 0, 1, 0, False, 0)
        assert result.served_from == TierName.MEMORY and result.slot is slot0 and slot0.readers == 1
        removed = await p.admin.delete_step(JOB, 0, "memory", False, False)
        assert [r.tier for r in removed.deleted] == ["memory"], removed.refused
        assert bytes(slot0.view(N)) == shard(0)  # the reader's pinned copy is intact
        with pytest.raises(NotFound):
            await p.restores.prepare_restore(JOB, 0, 1, 0, False, 0)  # a new read: clearly gone

        # The reader lets go; the slot's destroy is held in its worker thread while a save leases.
        threads.hold_next()
        release = asyncio.create_task(p.restores.release_restore(lease_id))
        for _ in range(1000):
            if threads.held.is_set():
                break
            await asyncio.sleep(0.005)
        assert threads.held.is_set(), "the released slot was not handed to a thread to destroy"
        save = asyncio.create_task(begin(p, 2))
        for _ in range(50):  # every chance to lease (it needs no thread when it takes a free slot)
            await asyncio.sleep(0)
        assert slot0.slot_id in p.pool.slots
        assert p.pool.bytes_in_use == 4 * MiB  # the slot being destroyed still counts
        threads.go.set()
        await release
        lease2 = await save

        assert lease2.slot is not slot0, "a save leased the slot being destroyed"
        assert slot0.mm.closed and not slot0.path.exists() and slot0.slot_id not in p.pool.slots
        slot2 = await commit(p, lease2)  # before, its crc pass or disk drain met "mmap closed or invalid"
        assert not slot2.mm.closed and bytes(slot2.view(N)) == shard(2)
        assert p.pool.bytes_in_use <= p.pool.budget_bytes
        p.pool.close()

    try:
        asyncio.run(scenario())
    finally:
        threads.go.set()  # never leave a held thread behind, pass or fail
        threads.shutdown()
        io.shutdown()


def test_a_slot_freed_while_read_is_destroyed_when_its_last_reader_lets_go(shm_dir: Path) -> None:
    async def run() -> None:
        pool = SlotPool(shm_dir, 4 * MiB)
        pool.scan()
        empty: Callable[[Slot], bool] = lambda s: s.content is None  # noqa: E731
        a = await pool.lease(("a", 0), N, empty, False, 0.0, 2)
        a.mm[:N] = shard(7)
        await pool.release_write(a)
        pool.hold(a)  # two readers (say a restore and a peer serve)
        pool.hold(a)
        await pool.free(a)
        assert a.retired and not a.mm.closed and a.path.exists() and pool.bytes_in_use == 2 * MiB
        with pytest.raises(NotFound):
            pool.hold(a)  # freed: no new reader
        b = await pool.lease(("b", 0), N, lambda s: True, False, 0.0, 2)  # the free 2 MiB
        with pytest.raises(BudgetExhausted):  # neither taken nor evicted, and its bytes still count
            await pool.lease(("c", 0), N, lambda s: True, False, 0.0, 2)
        await pool.release_reader(a)
        assert not a.mm.closed and bytes(a.view(N)) == shard(7)  # the other reader still reads it
        await pool.release_reader(a)
        assert a.mm.closed and not a.path.exists() and list(pool.slots.values()) == [b]
        c = await pool.lease(("c", 0), N, lambda s: True, False, 0.0, 2)  # its room is free now
        assert not c.mm.closed and pool.bytes_in_use == 4 * MiB
        pool.close()

    asyncio.run(run())


def test_a_step_whose_slots_were_reused_before_its_drain_is_superseded_not_forgotten(shm_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """The soak's other loss: the drain, busy with an older step, came back to find a staged step's
    slots taken by newer saves; it never said what became of that step, which stayed PENDING at
    the disk tier until the catalog forgot it ("acknowledged step 8 lost: ... not known")."""
    async def run() -> None:
        io = ThreadPoolExecutor(2)
        disk = DiskTier(tmp_path / "data", direct_io=False)
        p = build(shm_dir, tmp_path / "pins", io, disk)
        for step in range(3):  # the drain is not running yet: step 2 takes step 0's slot (1 is newer)
            await commit(p, await begin(p, step))
            await p.pool.stop()
        assert not p.catalog.require(JOB, 0).staged_in_slots
        assert p.catalog.require(JOB, 0).state(TierName.DISK) == TierState.PENDING
        drainer = DiskDrainer(p.catalog, p.pool, disk, DiskSection(direct_io=False), io)
        drainer.start()
        drainer.kick()
        await p.catalog.wait_level(JOB, 2, Level.LOCAL_DURABLE, 30.0)
        disk_state = {step: p.catalog.require(JOB, step).tiers.get(TierName.DISK) for step in range(3)}
        assert disk_state[0] == (TierState.SKIPPED, "superseded: memory copy reused")  # before: None (PENDING)
        assert disk_state[1] == (TierState.SKIPPED, "superseded by step 2")
        assert disk.list_committed(JOB) == [2]
        assert await drainer.stop(10.0)
        p.pool.close()
        io.shutdown()

    asyncio.run(run())


def test_a_step_whose_slots_were_reused_before_its_push_is_superseded_not_left_pending(shm_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """The replicator's form of the same loss: it picked only steps still in their slots, so a
    step whose slots newer saves took before its push stayed PENDING at the peer tier, and a
    REPLICATED wait on it ran to its timeout."""
    from ckptd.peers.replicator import Replicator

    async def run() -> None:
        p = build(shm_dir, tmp_path / "pins", ThreadPoolExecutor(2))
        for step in range(3):  # no replicator running yet: step 2 takes step 0's slot
            await commit(p, await begin(p, step))
        await p.catalog.wait_until(lambda: all(p.catalog.require(JOB, s).state(TierName.MEMORY) != TierState.PENDING
                                               for s in range(3)), 10.0)
        assert p.catalog.require(JOB, 0).state(TierName.PEER) == TierState.PENDING
        replicator = Replicator(p.catalog, p.pool, None)  # type: ignore[arg-type]  # _next needs no peers
        picked = await replicator._next()
        assert picked is not None and picked.step == 2
        peer = {step: p.catalog.require(JOB, step).tiers.get(TierName.PEER) for step in range(2)}
        assert peer[0] == (TierState.SKIPPED, "superseded: memory copy reused")  # before: PENDING for good
        assert peer[1] == (TierState.SKIPPED, "superseded by step 2")
        await p.pool.stop()
        p.pool.close()

    asyncio.run(run())
