"""Restore copies of numpy arrays split over a few threads, as torch's ``copy_`` uses its intra-op threads.

A restore copies each array out of a slot the client has just mapped: most of that time is the
kernel filling page tables for 4 KiB pages on first touch, which is per-page work that runs in
parallel on several cores, and while the restore runs the training loop is blocked and its other
cores idle. ``np.copyto`` releases the GIL for plain dtypes, so pieces of one copy handed to a
small pool run in parallel. Measured on the 2-vCPU test host, 512 MiB out of a freshly mapped
slot: one thread 0.11 s (16 MiB pieces), two threads 0.065-0.073 s; torch's copy_ 0.06 s.
Saves do not use it: the save copy writes into pre-faulted slot pages and is bound by memory
bandwidth, where one thread's non-temporal copy is fastest (0.042 s against 0.050-0.063 s on two).

The same pool (``executor``) runs the restore's chunk copies (slot_copy.py).

Invariants: ``copyto`` returns only after every piece is copied, and raises the first error of
any piece; copies under ``MIN_PARALLEL_BYTES``, non-contiguous arrays, differing dtypes (byte
order) and hosts with one cpu stay on the calling thread (plain ``np.copyto``); the pool is
created on first use and replaced in a forked child (its threads do not survive a fork).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np

THREADS: Final = max(1, min(4, os.cpu_count() or 1))
PIECE_BYTES: Final = 4 * 2**20  # 4, 16 and 64 MiB measured alike; small keeps the threads even
MIN_PARALLEL_BYTES: Final = 2 * PIECE_BYTES

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def executor() -> ThreadPoolExecutor:
    """The pool (made on first use; a forked child makes its own)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="ckptd-copy")
        return _pool


def _forget_pool() -> None:  # in a forked child: the parent's threads are not there
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def copyto(dst: np.ndarray[Any, Any], src: np.ndarray[Any, Any]) -> None:
    """``np.copyto(dst, src, casting="equiv")``, over ``THREADS`` threads when large and contiguous."""
    n = dst.nbytes
    if (THREADS == 1 or n < MIN_PARALLEL_BYTES or dst.shape != src.shape or dst.dtype != src.dtype
            or not dst.flags.c_contiguous or not src.flags.c_contiguous or dst.dtype.hasobject):
        np.copyto(dst, src, casting="equiv")  # also what converts byte order
        return
    d = dst.reshape(-1).view(np.uint8)
    s = src.reshape(-1).view(np.uint8)
    pool = executor()
    futures = [pool.submit(np.copyto, d[a : a + PIECE_BYTES], s[a : a + PIECE_BYTES])
               for a in range(0, n, PIECE_BYTES)]
    for f in futures:  # every piece has ended before this returns, even when one failed
        f.exception()
    for f in futures:
        f.result()


__all__ = ["MIN_PARALLEL_BYTES", "PIECE_BYTES", "THREADS", "copyto", "executor"]
