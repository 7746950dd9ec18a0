"""Daemon-owned shared-memory slots: the memory tier and the hand-off buffer of the save path.

Each slot is a file ``slot-<uuid>.bin`` in a private directory (0700, files 0600), allocated once
with posix_fallocate (so its pages exist before any copy), mapped by the daemon and by the client,
and reused across steps. A slot holding a committed shard has a sidecar ``slot-<uuid>.meta.json``
(written atomically after the daemon checksummed the bytes); leasing a slot for writing removes
the sidecar first, so a slot torn by a trainer killed mid-copy is never taken for a committed
shard, by this daemon or by the next one after a restart.

A slot is ``fresh`` while its pages exist but are not mapped writable into the daemon: a peer
transfer then writes it through the file (``pwrite``) rather than faulting every 4 KiB page of
the mapping in (peer_bulk.recv_frames), and ``populate_soon`` maps it in the background
afterwards, so its next transfer lands straight in the mapping. Only ``populate`` clears the
flag (leasing does not): a slot left ``fresh`` costs a later transfer the file path, never a
wrong byte, since both paths write the same pages.

A save lease may ask for spares (``spare=True``): when its owner is left with no free slot and
is under its slot cap, the owner's remaining slots are created one by one (fallocate'd and
faulted in) by a background task the pool owns, so the pool grows during a job's first steps and
not at whichever later step first finds every slot busy; ``start_spares`` does it on request
(PrepareSave, ckptd/save/prepare.py). A lease that would grow the pool while its owner's spares
are being made waits for the next one instead (under skip too: that slot is being made). A
spare only takes room the budget has free (it never evicts); any lease may take an empty one.

Readers pin a slot (``hold``: a drain, a push, a peer serve, a restore, the crc pass) and let go
with ``release_reader``; a pinned slot is never reused, evicted or closed. ``free`` (and an
eviction) first *retires* the slot, at once and before any await: a retired slot is never leased
or pinned again, and its mapping is closed and its file removed only once its last reader let go
(before, ``free`` handed the slot to a thread to destroy, and a lease arriving meanwhile reused it:
its save then lost its bytes with "mmap closed or invalid"). A retired slot counts against the
budget until its bytes are freed.

The pool keeps ``sum(capacity) + bytes of slots being created <= budget_bytes``. When no slot
can be had, a lease waits on a condition (back-pressure) up to its timeout, or fails at once
under the skip policy: never an unbounded allocation. The caller's ``reusable`` predicate decides
which slots may be reused (the catalog knows which steps must stay in memory).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckptd.core.errors import BudgetExhausted, CkptdError, NotFound
from ckptd.core.populate import populate as populate_mapping
from ckptd.core.types import SLOT_ALIGN_BYTES
from ckptd.memory.slot_files import META_SUFFIX, SUFFIX, Slot, create_slot, prepare_dir, remove_slot, write_sidecar

__all__ = ["Slot", "SlotPool", "populate", "slot_bytes"]

log = logging.getLogger("ckptd.shm")

def slot_bytes(nbytes: int) -> int:
    """The capacity of a slot made for a shard of nbytes (aligned up, one alignment unit at least)."""
    return max(SLOT_ALIGN_BYTES, (nbytes + SLOT_ALIGN_BYTES - 1) // SLOT_ALIGN_BYTES * SLOT_ALIGN_BYTES)


def populate(slot: Slot) -> None:
    """Fault the slot's pages into this process's mapping, writable (blocking, ckptd/core/populate.py); a
    kernel without MADV_POPULATE_WRITE (before 5.14) leaves it to the first access."""
    try:
        populate_mapping(slot.mm)  # in steps, the GIL released: the event loop is held up one step at most
    except (OSError, ValueError):  # no such advice, or the slot was destroyed meanwhile
        return
    slot.fresh = False  # mapped here now: no reason left to write it through its file


class SlotPool:
    """All slots of this daemon, under one byte budget."""

    def __init__(self, directory: Path, budget_bytes: int, shared_gid: int | None = None) -> None:
        self.directory = directory
        self.budget_bytes = budget_bytes
        self.shared_gid = shared_gid  # slot files 0660 in this group (None: 0600, the daemon's user only)
        self.slots: dict[str, Slot] = {}
        self._cond = asyncio.Condition()
        self._spares: dict[tuple[str, int], asyncio.Task[None]] = {}  # owner -> its spare being made
        self._reserved_bytes = 0  # capacity of the slots being made
        self._populating: dict[str, asyncio.Task[None]] = {}  # slot_id -> populate_soon's task
        self._destroying: set[str] = set()  # retired slots whose mapping and file are being removed

    @property
    def bytes_in_use(self) -> int:
        return sum(s.capacity for s in self.slots.values()) + self._reserved_bytes

    # -- start-up ---------------------------------------------------------------------------
    def scan(self) -> list[tuple[Slot, dict[str, Any]]]:
        """Map surviving slots that have a sidecar; delete every other file. Blocking.

        Returns (slot, sidecar) pairs; the caller verifies checksums and adopts or frees them.
        """
        prepare_dir(self.directory, self.shared_gid)
        found: list[tuple[Slot, dict[str, Any]]] = []
        for entry in sorted(self.directory.iterdir()):
            name = entry.name
            if name.endswith(META_SUFFIX):
                if not entry.with_name(name[: -len(META_SUFFIX)] + SUFFIX).exists():
                    entry.unlink(missing_ok=True)
                continue
            if not (name.startswith("slot-") and name.endswith(SUFFIX)):
                entry.unlink(missing_ok=True)  # temp sidecars and strangers
                continue
            slot_id = name[len("slot-") : -len(SUFFIX)]
            meta_path = entry.with_name(f"slot-{slot_id}{META_SUFFIX}")
            try:
                meta = json.loads(meta_path.read_bytes())
                size = entry.stat().st_size
                if not isinstance(meta, dict) or size <= 0:
                    raise ValueError("bad sidecar")
            except (OSError, ValueError):
                log.info("removing stale slot %s (no valid sidecar)", name)
                entry.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                continue
            if self.bytes_in_use + size > self.budget_bytes:
                log.warning("slot %s does not fit the budget any more; removing it", name)
                entry.unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                continue
            fd = os.open(entry, os.O_RDWR)
            try:
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            slot = Slot(slot_id, entry, size, mm)
            self.slots[slot_id] = slot
            found.append((slot, meta))
        return found

    # -- leasing ----------------------------------------------------------------------------
    async def lease(self, owner: tuple[str, int], nbytes: int, reusable: Callable[[Slot], bool], wait: bool,
                    timeout_s: float, max_slots_per_owner: int, spare: bool = False,
                    prefer: str | None = None) -> Slot:
        """Return a slot of at least nbytes for owner, marked ``writing``, its sidecar removed;
        with ``spare``, make the owner's remaining slots in the background if it has none free."""
        need = slot_bytes(nbytes)
        if need > self.budget_bytes:
            raise BudgetExhausted(
                f"a shard of {nbytes} bytes does not fit the shm budget of {self.budget_bytes} "
                "bytes (memory.budget_bytes)"
            )
        deadline = time.monotonic() + timeout_s
        async with self._cond:
            while True:
                # While the owner's spares are being made (after a save, or asked ahead by
                # PrepareSave), a lease takes the next one as it lands (never slower than making
                # another, nor twice the work) instead of growing; under skip too.
                making = owner in self._spares
                slot = await self._try_lease(owner, nbytes, need, reusable, max_slots_per_owner, not making, prefer)
                if slot is not None:
                    if spare:
                        self._plan_spares(owner, need, reusable, max_slots_per_owner)
                    return slot
                remaining = deadline - time.monotonic()
                if (not wait and not making) or remaining <= 0:
                    raise BudgetExhausted(
                        f"no shm slot free for {owner[0]} rank {owner[1]} within the budget of "
                        f"{self.budget_bytes} bytes ({self.bytes_in_use} in use)"
                        + ("; save skipped by policy" if not wait else f" after {timeout_s:.1f}s")
                    )
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=min(remaining, 1.0))
                except TimeoutError:
                    pass

    async def _try_lease(self, owner: tuple[str, int], nbytes: int, need: int, reusable: Callable[[Slot], bool],
                         max_slots_per_owner: int, grow: bool = True, prefer: str | None = None) -> Slot | None:
        mine = [s for s in self.slots.values() if s.owner == owner]
        free = [s for s in mine if self._idle(s) and reusable(s)]
        fitting = sorted((s for s in free if s.capacity >= nbytes), key=lambda s: (s.slot_id != prefer, s.last_used_s))
        if fitting:
            return await self._take(fitting[0], owner)
        if not grow:
            return None
        # Grow: free reusable slots (ours first, least recently used first) until a new slot
        # of ``need`` bytes fits the budget and the per-owner slot cap.
        others = sorted(
            (s for s in self.slots.values()
             if s.owner != owner and self._idle(s) and reusable(s)),
            key=lambda s: s.last_used_s,
        )
        candidates = [*sorted(free, key=lambda s: s.last_used_s), *others]
        to_free: list[Slot] = []
        if len(mine) >= max_slots_per_owner:
            if not free:
                return None
            to_free.append(candidates.pop(0))
        for cand in candidates:
            if self.bytes_in_use - sum(s.capacity for s in to_free) + need <= self.budget_bytes:
                break
            to_free.append(cand)
        if self.bytes_in_use - sum(s.capacity for s in to_free) + need > self.budget_bytes:
            return None
        for s in to_free:  # retired before the first await: no lease, restore or drain takes them
            self._retire(s)
        for s in to_free:
            await self._destroy(s)
        slot = await self._create_counted(need, self._create)
        slot.owner = owner
        slot.writing = True
        self.slots[slot.slot_id] = slot
        return slot

    def _plan_spares(self, owner: tuple[str, int], need: int, reusable: Callable[[Slot], bool],
                     max_slots_per_owner: int) -> None:
        """Start making the owner's remaining slots if it has none free (one task per owner)."""
        if owner in self._spares:
            return
        mine = [s for s in self.slots.values() if s.owner == owner]
        if len(mine) >= max_slots_per_owner or self.bytes_in_use + need > self.budget_bytes:
            return
        if any(self._idle(s) and reusable(s) and s.capacity >= need for s in mine):
            return
        self.start_spares(owner, need, max_slots_per_owner)

    def start_spares(self, owner: tuple[str, int], need: int, target: int) -> asyncio.Task[None] | None:
        """Make slots of ``need`` bytes for owner, populated, in the background until it has ``target``
        slots or the budget has no free room (never evicting); the task already at it, if any."""
        task = self._spares.get(owner)
        if task is None and sum(1 for s in self.slots.values() if s.owner == owner) < target \
                and self.bytes_in_use + need <= self.budget_bytes:
            task = self._spares[owner] = asyncio.create_task(self._make_spares(owner, need, target),
                                                             name=f"spare-slots-{owner[0]}-{owner[1]}")
        return task

    async def _make_spares(self, owner: tuple[str, int], need: int, target: int) -> None:
        try:
            while (sum(1 for s in self.slots.values() if s.owner == owner) < target
                   and self.bytes_in_use + need <= self.budget_bytes):
                slot = await self._create_counted(need, self._create_populated)
                slot.owner = owner
                self.slots[slot.slot_id] = slot
                await self.notify()
        except Exception as exc:  # noqa: BLE001 - a missing spare only costs a later save its head start
            log.info("spare slot for %s rank %d not created: %s", owner[0], owner[1], exc)
        finally:
            self._spares.pop(owner, None)
            await self.notify()  # a lease waiting for a spare may grow the pool itself now

    async def _create_counted(self, need: int, create: Callable[[int], Slot]) -> Slot:
        """Make a slot off the loop, its bytes in ``bytes_in_use`` meanwhile (nothing else takes that room)."""
        self._reserved_bytes += need
        try:
            return await asyncio.to_thread(create, need)
        finally:
            self._reserved_bytes -= need

    def _create(self, capacity: int) -> Slot:
        return create_slot(self.directory, capacity, self.shared_gid)

    def _create_populated(self, capacity: int) -> Slot:
        slot = self._create(capacity)
        populate(slot)  # the daemon's crc pass will not fault it in
        return slot

    def populate_soon(self, slot: Slot) -> None:
        """Map a ``fresh`` slot (just written through its file) into this process in the
        background, off the transfer that filled it; content is untouched, so readers may run."""
        if not slot.fresh or slot.slot_id in self._populating:
            return
        task = asyncio.create_task(asyncio.to_thread(populate, slot), name=f"populate-{slot.slot_id[:8]}")
        self._populating[slot.slot_id] = task
        task.add_done_callback(lambda _t: self._populating.pop(slot.slot_id, None))

    async def stop(self) -> None:
        """Wait for the spares being created (seconds at most each) and the slots being populated."""
        await asyncio.gather(*self._spares.values(), *self._populating.values(), return_exceptions=True)

    async def _take(self, slot: Slot, owner: tuple[str, int]) -> Slot:
        slot.writing, slot.owner, slot.content, slot.last_used_s = True, owner, None, time.monotonic()
        slot.meta_path.unlink(missing_ok=True)  # tmpfs: microseconds, no thread hop needed
        return slot

    @staticmethod
    def _idle(slot: Slot) -> bool:
        """Neither written, read nor retired: a lease may take it (if its content is reusable)."""
        return not slot.writing and slot.readers == 0 and not slot.retired

    @staticmethod
    def _retire(slot: Slot) -> None:
        slot.retired, slot.content = True, None

    async def _destroy(self, slot: Slot) -> None:
        """Remove a retired slot's files and mapping (once); its bytes count until they are freed."""
        if slot.slot_id in self._destroying:
            return
        self._destroying.add(slot.slot_id)
        try:
            await asyncio.to_thread(remove_slot, slot)
        finally:
            self._destroying.discard(slot.slot_id)
            self.slots.pop(slot.slot_id, None)

    def hold(self, slot: Slot) -> None:
        """Pin the slot for one reader until ``release_reader``: meanwhile it is not reused, evicted
        or closed. NotFound if it was freed (a retired slot is never pinned again)."""
        if slot.retired:
            raise NotFound(f"slot {slot.slot_id[:8]} was freed")
        slot.readers += 1

    async def free(self, slot: Slot) -> None:
        """Delete a slot entirely (its bytes are no longer wanted): retired at once, destroyed now,
        or when its last reader lets go."""
        self._retire(slot)
        if slot.readers == 0:
            await self._destroy(slot)
        await self.notify()

    async def release_write(self, slot: Slot) -> None:
        slot.writing = False
        slot.last_used_s = time.monotonic()
        await self.notify()

    async def release_reader(self, slot: Slot, free: bool = False) -> None:
        """One reader (``hold``) is done with the slot; with ``free``, the slot goes too (retired
        now, destroyed when no other reader holds it)."""
        if free:
            self._retire(slot)
        slot.readers = max(0, slot.readers - 1)
        if slot.retired and slot.readers == 0:
            await self._destroy(slot)
        await self.notify()

    async def notify(self) -> None:
        """Wake leases waiting for room (call after anything that may make a slot reusable)."""
        async with self._cond:
            self._cond.notify_all()

    write_sidecar = staticmethod(write_sidecar)  # atomically record what a slot holds (blocking)

    async def lease_scratch(self, nbytes: int, wait: bool, timeout_s: float,
                            reusable: Callable[[Slot], bool] | None = None, prefer: str | None = None) -> Slot:
        """A slot for a restore read, owned by nobody; counts against the same budget. It may
        take the room of slots ``reusable`` allows (default: only empty ones); ``prefer`` (a
        slot id) is taken first when it is free and fits."""
        return await self.lease(("", -1), nbytes, reusable or (lambda s: s.content is None), wait, timeout_s,
                                1 << 30, prefer=prefer)

    def close(self) -> None:
        for slot in list(self.slots.values()):
            try:
                slot.mm.close()
            except (BufferError, ValueError, CkptdError):
                pass
