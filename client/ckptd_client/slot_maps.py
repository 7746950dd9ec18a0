"""Client-side mappings of the daemon's save slots, kept and reused across saves.

A save copies into a slot the daemon leased; mapping a slot (and faulting its pages in) costs
more than the copy, so each slot path is mapped once, populated writable in one call, and kept
(least recently used first out, ``max_maps`` at most); a mapping smaller than the capacity a
save asks for is made anew from the file's current size.

A restore that reads a slot this client already maps (the memory copy of a step it saved)
borrows that mapping (``borrow``: same file, by device and inode) instead of mapping and faulting
the slot in again; it only reads through it and never closes it.

Invariant: a mapping is closed only when evicted or at ``close``; the torch view over it (when
torch is loaded) is dropped first, so no view outlives its mapping. ``warm`` (a background
thread mapping a slot ahead of need, slot_warmer.py) adds a mapping only where there is room
and never evicts one; the map's structure is guarded by a lock.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

MADV_POPULATE_WRITE = 23  # Linux >= 5.14; Python 3.11's mmap does not name it


class SlotMaps:
    """Client-side mappings of the daemon's slots, kept and reused across saves (LRU)."""

    def __init__(self, max_maps: int = 6, on_drop: Callable[[str], None] | None = None) -> None:
        self.on_drop = on_drop  # told before a mapping goes (views over it must be dropped first)
        self.maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self.files: dict[str, tuple[int, int]] = {}  # path -> (st_dev, st_ino) of the file mapped
        self.mapped_count = 0  # mappings made so far (a save that made one may have new slots ahead)
        self._lock = threading.RLock()  # the save path and SlotWarmer's thread
        self.bases: dict[str, Any] = {}  # path -> uint8 torch tensor over the mapping (dropped first)
        self.max_maps = max_maps

    def base(self, path: str) -> Any:
        """A uint8 torch tensor over the whole mapping of path, made once (None without torch)."""
        import sys

        torch = sys.modules.get("torch")
        if torch is None:
            return None
        with self._lock:
            t = self.bases.get(path)
            if t is None:
                t = self.bases[path] = torch.frombuffer(self.maps[path], dtype=torch.uint8)
            return t

    def borrow(self, fd: int, nbytes: int) -> mmap.mmap | None:
        """The mapping of the file ``fd`` is open on, if this client maps it whole (a restore reads
        through it and must not close it), else None."""
        st = os.fstat(fd)
        with self._lock:
            for path, ids in self.files.items():
                mm = self.maps.get(path)
                if ids == (st.st_dev, st.st_ino) and mm is not None and len(mm) >= nbytes:
                    return mm
        return None

    def has(self, path: str, capacity: int) -> bool:
        mm = self.maps.get(path)
        return mm is not None and len(mm) >= capacity

    def warm(self, path: str) -> bool:
        """Map path ahead of need (SlotWarmer) unless mapped; never evicts a mapping: False when
        the map is full. The mapping is made outside the lock, so a save is not held up by it."""
        with self._lock:
            if path in self.maps:
                return True
            if len(self.maps) >= self.max_maps:
                return False
        mm, ids = self._map(path)
        with self._lock:
            if path not in self.maps and len(self.maps) < self.max_maps:
                self.maps[path], self.files[path] = mm, ids
                return True
        mm.close()
        return path in self.maps

    def get(self, path: str, capacity: int) -> mmap.mmap:
        with self._lock:
            mm = self.maps.get(path)
            if mm is not None and len(mm) >= capacity:
                self.maps.move_to_end(path)
                return mm
            self._drop(path)
            mm, self.files[path] = self._map(path)
            self.maps[path] = mm
            self.mapped_count += 1
            while len(self.maps) > self.max_maps:
                old_path, old = self.maps.popitem(last=False)
                self._drop(old_path)
                try:
                    old.close()
                except BufferError:
                    pass
            return mm

    @staticmethod
    def _map(path: str) -> tuple[mmap.mmap, tuple[int, int]]:
        fd = os.open(path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        try:
            mm.madvise(MADV_POPULATE_WRITE)  # fault the page tables in once, not on every save
        except OSError:
            pass
        return mm, (st.st_dev, st.st_ino)

    def _drop(self, path: str) -> None:
        if self.on_drop is not None:
            self.on_drop(path)
        self.bases.pop(path, None)
        self.files.pop(path, None)

    def close(self) -> None:
        with self._lock:
            for path in list(self.maps):
                self._drop(path)
            self.bases.clear()
            for mm in self.maps.values():
                try:
                    mm.close()
                except BufferError:
                    pass
            self.maps.clear()


__all__ = ["SlotMaps"]
