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
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ckptd.core import failpoints
from ckptd.core.errors import BudgetExhausted, CkptdError, InvalidArgument
from ckptd.core.populate import populate as populate_mapping
from ckptd.core.types import SLOT_ALIGN_BYTES

log = logging.getLogger("ckptd.shm")

_SUFFIX = ".bin"
_META_SUFFIX = ".meta.json"


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


@dataclass
class Slot:
    """One mapped slot file. ``content`` is the shard it holds (opaque to the pool)."""

    slot_id: str
    path: Path
    capacity: int
    mm: mmap.mmap
    owner: tuple[str, int] | None = None  # (job, rank) the slot serves
    writing: bool = False  # leased to a client for a save
    readers: int = 0  # drains, pushes, peer serves and restores reading it (not reusable meanwhile)
    content: Any = None
    last_used_s: float = field(default_factory=time.monotonic)
    fresh: bool = False  # pages not mapped writable here yet (see the module docstring)

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name[: -len(_SUFFIX)] + _META_SUFFIX)

    def view(self, nbytes: int) -> memoryview:
        return memoryview(self.mm)[:nbytes]


DIR_MODE_PRIVATE: Final = 0o700
DIR_MODE_GROUP: Final = 0o2750  # setgid: slot files belong to the group; the group may list, never write
FILE_MODE_GROUP: Final = 0o660  # trainers of the group map slots read-write (the save copy)


def prepare_dir(path: Path, gid: int | None = None) -> None:
    """Create the slot directory, or check that an existing one is ours; make it private (0700),
    or, with ``gid`` (daemon.socket_mode "0660"), 2750 in that group."""
    mode = DIR_MODE_PRIVATE if gid is None else DIR_MODE_GROUP
    try:
        path.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise InvalidArgument(f"shm directory parent {path.parent} does not exist") from None
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"shm path {path} exists and is not a directory")
    if st.st_uid != os.getuid():
        raise InvalidArgument(f"shm directory {path} is owned by uid {st.st_uid}, not us")
    if gid is not None and st.st_gid != gid:
        os.chown(path, -1, gid)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


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
            if name.endswith(_META_SUFFIX):
                if not entry.with_name(name[: -len(_META_SUFFIX)] + _SUFFIX).exists():
                    entry.unlink(missing_ok=True)
                continue
            if not (name.startswith("slot-") and name.endswith(_SUFFIX)):
                entry.unlink(missing_ok=True)  # temp sidecars and strangers
                continue
            slot_id = name[len("slot-") : -len(_SUFFIX)]
            meta_path = entry.with_name(f"slot-{slot_id}{_META_SUFFIX}")
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
        free = [s for s in mine if not s.writing and s.readers == 0 and reusable(s)]
        fitting = sorted((s for s in free if s.capacity >= nbytes), key=lambda s: (s.slot_id != prefer, s.last_used_s))
        if fitting:
            return await self._take(fitting[0], owner)
        if not grow:
            return None
        # Grow: free reusable slots (ours first, least recently used first) until a new slot
        # of ``need`` bytes fits the budget and the per-owner slot cap.
        others = sorted(
            (s for s in self.slots.values()
             if s.owner != owner and not s.writing and s.readers == 0 and reusable(s)),
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
        for s in to_free:  # claimed before the first await: no restore or drain starts reading them
            s.writing, s.content = True, None
        for s in to_free:
            await asyncio.to_thread(self._destroy, s)
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
        if any(not s.writing and s.readers == 0 and reusable(s) and s.capacity >= need for s in mine):
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

    def _create(self, capacity: int) -> Slot:
        slot_id = uuid.uuid4().hex
        path = self.directory / f"slot-{slot_id}{_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if self.shared_gid is not None:  # trainers of another user (daemon.socket_mode "0660")
                os.fchown(fd, -1, self.shared_gid)
                os.fchmod(fd, FILE_MODE_GROUP)
            try:
                os.posix_fallocate(fd, 0, capacity)  # pages exist before the first copy
            except OSError as exc:
                os.close(fd)
                fd = -1
                path.unlink(missing_ok=True)
                raise BudgetExhausted(f"cannot allocate a {capacity}-byte shm slot: {exc}") from None
            mm = mmap.mmap(fd, capacity)
        finally:
            if fd >= 0:
                os.close(fd)
        return Slot(slot_id, path, capacity, mm, fresh=True)

    def _destroy(self, slot: Slot) -> None:
        self.slots.pop(slot.slot_id, None)
        slot.meta_path.unlink(missing_ok=True)
        slot.path.unlink(missing_ok=True)
        try:
            slot.mm.close()
        except BufferError:
            log.warning("slot %s still has exported views; leaving its mapping open", slot.slot_id)

    async def free(self, slot: Slot) -> None:
        """Delete a slot entirely (its bytes are no longer wanted)."""
        await asyncio.to_thread(self._destroy, slot)
        await self.notify()

    async def release_write(self, slot: Slot) -> None:
        slot.writing = False
        slot.last_used_s = time.monotonic()
        await self.notify()

    async def release_reader(self, slot: Slot) -> None:
        """One reader (``readers`` + 1 by a drain, push or restore) is done with the slot."""
        slot.readers = max(0, slot.readers - 1)
        await self.notify()

    async def notify(self) -> None:
        """Wake leases waiting for room (call after anything that may make a slot reusable)."""
        async with self._cond:
            self._cond.notify_all()

    def write_sidecar(self, slot: Slot, meta: dict[str, Any]) -> None:
        """Atomically record what a slot holds (blocking). Only checksummed shards get one."""
        failpoints.hit("shm.sidecar.before_write")
        tmp = slot.meta_path.with_name(slot.meta_path.name + ".tmp")
        data = json.dumps(meta, separators=(",", ":")).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, slot.meta_path)

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
