"""A slot's files: the ``Slot`` record, the private shm directory, making, recording and
removing one slot file (blocking; the pool, slots.py, calls these off the event loop).

A slot is ``slot-<uuid>.bin`` in a directory that is private (0700, files 0600) or, with a shared
group (daemon.socket_mode "0660"), 2750 with files 0660 in that group. It is allocated with
posix_fallocate, so its pages exist before the first copy. Its sidecar ``slot-<uuid>.meta.json``,
written atomically (temp file, rename), records what a committed slot holds.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ckptd.core import failpoints
from ckptd.core.errors import BudgetExhausted, InvalidArgument

log = logging.getLogger("ckptd.shm")

SUFFIX: Final = ".bin"
META_SUFFIX: Final = ".meta.json"
DIR_MODE_PRIVATE: Final = 0o700
DIR_MODE_GROUP: Final = 0o2750  # setgid: slot files belong to the group; the group may list, never write
FILE_MODE_GROUP: Final = 0o660  # trainers of the group map slots read-write (the save copy)


@dataclass
class Slot:
    """One mapped slot file. ``content`` is the shard it holds (opaque to the pool)."""

    slot_id: str
    path: Path
    capacity: int
    mm: mmap.mmap
    owner: tuple[str, int] | None = None  # (job, rank) the slot serves
    writing: bool = False  # leased to a client for a save
    readers: int = 0  # pins of drains, pushes, peer serves and restores reading it (SlotPool.hold)
    retired: bool = False  # freed: never leased or pinned again; destroyed once no reader holds it
    content: Any = None
    last_used_s: float = field(default_factory=time.monotonic)
    fresh: bool = False  # pages not mapped writable here yet (slots.py's docstring)

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name[: -len(SUFFIX)] + META_SUFFIX)

    def view(self, nbytes: int) -> memoryview:
        return memoryview(self.mm)[:nbytes]


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


def create_slot(directory: Path, capacity: int, gid: int | None) -> Slot:
    """A new slot file of ``capacity`` bytes, allocated and mapped (BudgetExhausted if tmpfs is full)."""
    slot_id = uuid.uuid4().hex
    path = directory / f"slot-{slot_id}{SUFFIX}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if gid is not None:  # trainers of another user (daemon.socket_mode "0660")
            os.fchown(fd, -1, gid)
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


def remove_slot(slot: Slot) -> None:
    """Remove a slot's sidecar and file and close its mapping (left open while views are exported)."""
    slot.meta_path.unlink(missing_ok=True)
    slot.path.unlink(missing_ok=True)
    try:
        slot.mm.close()
    except BufferError:
        log.warning("slot %s still has exported views; leaving its mapping open", slot.slot_id)


def write_sidecar(slot: Slot, meta: dict[str, Any]) -> None:
    """Atomically record what a slot holds. Only committed shards get one."""
    failpoints.hit("shm.sidecar.before_write")
    tmp = slot.meta_path.with_name(slot.meta_path.name + ".tmp")
    data = json.dumps(meta, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, slot.meta_path)
