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
thread mapping a slot ahead of need: slot_warmer.py, save/prep.py) adds a mapping only where
there is room and never evicts one; the map's structure is guarded by a lock. A path is mapped
by one caller at a time: a save that needs a slot ``warm`` is mapping waits for that mapping
(begun earlier, so done sooner) instead of mapping it again. After ``close`` nothing is added:
a mapping under way is closed, and populated in steps, it stops within one. The steps release
the GIL and the memory-map lock between them (ckptd/core/populate.py), so a mapping made in the
background stalls the training thread one step at most, not the whole slot.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ckptd.core.populate import populate


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
        self._mapping: dict[str, threading.Event] = {}  # paths warm() is mapping now (set when done)
        self._closed = False

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
            if path in self.maps or path in self._mapping:
                return path in self.maps or not self._closed
            if self._closed or len(self.maps) >= self.max_maps:
                return False
            done = self._mapping[path] = threading.Event()
        mm: mmap.mmap | None = None
        try:
            mm, ids = self._map(path, lambda: self._closed)
            with self._lock:
                if not self._closed and path not in self.maps and len(self.maps) < self.max_maps:
                    self.maps[path], self.files[path], mm = mm, ids, None
                    return True
                return path in self.maps
        finally:
            with self._lock:
                del self._mapping[path]
            done.set()
            if mm is not None:
                mm.close()

    def get(self, path: str, capacity: int) -> mmap.mmap:
        while True:
            with self._lock:
                done = self._mapping.get(path)
                if done is None:
                    return self._get(path, capacity)
            done.wait()  # warm() is mapping it: the mapping it makes is the one this save wants

    def _get(self, path: str, capacity: int) -> mmap.mmap:
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
    def _map(path: str, cancelled: Callable[[], bool] = lambda: False) -> tuple[mmap.mmap, tuple[int, int]]:
        fd = os.open(path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        try:  # fault the page tables in once, not on every save
            populate(mm, cancelled)
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
            self._closed = True
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
