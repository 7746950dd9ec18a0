"""Fault a shared mapping's pages in, writable, in steps and without holding the GIL.

``MADV_POPULATE_WRITE`` (Linux >= 5.14) faults a range of a mapping in with one call: for a new
tmpfs slot that is the pages' first touch (cleared then), for one already touched only the page
tables. One call over a whole slot stops the process's other threads for as long:
``mmap.madvise`` holds the GIL through it, and the kernel holds the process's memory-map lock,
which any thread that maps memory (an allocator growing, a new slot mapped) must wait for: the
daemon's event loop behind a spare being populated, a trainer's training thread behind a slot
mapped in the background (docs/architecture.md, "Populating in steps").
``populate`` makes the call through ctypes (the GIL released) in ``STEP_BYTES`` steps (the
lock released between them), so another thread waits one step at most.

Invariant: the mapping is exported only for each call (a ctypes anchor, dropped before the
next), so the caller may close it afterwards; a kernel that refuses the advice raises OSError.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from typing import Final

MADV_POPULATE_WRITE: Final = 23  # Python 3.11's mmap does not name it
STEP_BYTES: Final = 64 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def populate_write(mm: mmap.mmap, start: int, length: int) -> None:
    """One MADV_POPULATE_WRITE over ``mm[start:start + length]`` (start page-aligned), the GIL
    released; OSError when the kernel refuses (before 5.14)."""
    anchor = ctypes.c_char.from_buffer(mm, start)  # an export of the mapping, dropped at once
    try:
        if _libc.madvise(ctypes.addressof(anchor), length, MADV_POPULATE_WRITE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        del anchor


def populate(mm: mmap.mmap, cancelled: Callable[[], bool] = lambda: False, step_bytes: int = STEP_BYTES) -> bool:
    """Populate the whole mapping step by step; False if ``cancelled()`` stopped it first."""
    size = len(mm)
    for start in range(0, size, step_bytes):
        if cancelled():
            return False
        populate_write(mm, start, min(step_bytes, size - start))
    return True


__all__ = ["MADV_POPULATE_WRITE", "STEP_BYTES", "populate", "populate_write"]
