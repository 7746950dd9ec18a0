"""The two floors ``bench/stall.py`` measures ckptd against: a bare memcpy and a bare fsync'd write.

``FloorCopier`` copies the state's tensors, tensor by tensor, into a pre-faulted /dev/shm mapping
(ckptd's shard layout) with torch ``Tensor.copy_`` or ``ctypes.memmove``: the save-stall floor;
``restore_copy`` copies them back from it into the tensors, and ``restore_pooled`` does the same
copies in 4 MiB pieces over a pool of threads (one per core, at most 4) with ``np.copyto``: the
restore floor is the faster of the two.
``write_buffered`` and ``write_direct`` write the same bytes to a new file in 8 MiB blocks, with
write(2) or O_DIRECT, then fsync: the disk-drain floor. Each returns the seconds it took.
"""

from __future__ import annotations

import ctypes
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _util import MIB, ShmFile

BLOCK = 8 * MIB


# -- the memcpy floor -----------------------------------------------------------------------------
class FloorCopier:
    """Copies the state's tensors into a pre-faulted shm mapping; the views are built once."""

    def __init__(self, tensors: list[Any], offsets: list[int], shm: ShmFile) -> None:
        import torch

        self.pairs: list[tuple[Any, Any]] = []
        self.raw: list[tuple[int, int, int]] = []
        self._arr: Any = (ctypes.c_char * shm.capacity).from_buffer(shm.mm)
        base = ctypes.addressof(self._arr)
        for t, off in zip(tensors, offsets):
            n = t.numel()
            if n == 0:
                continue
            assert t.is_contiguous() and t.device.type == "cpu"
            dst = torch.frombuffer(shm.mm, dtype=t.dtype, count=n, offset=off).view(t.shape)
            self.pairs.append((t, dst))
            self.raw.append((base + off, t.data_ptr(), n * t.element_size()))
        self.flat = [(t.view(-1).view(torch.uint8).numpy(), d.view(-1).view(torch.uint8).numpy())
                     for t, d in self.pairs]
        self._pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))

    def torch_copy(self) -> float:
        t0 = time.perf_counter()
        for src, dst in self.pairs:
            dst.copy_(src)
        return time.perf_counter() - t0

    def restore_copy(self) -> float:
        """The restore floor: the same bytes copied back from the mapping into the tensors."""
        t0 = time.perf_counter()
        for dst, src in self.pairs:
            dst.copy_(src)
        return time.perf_counter() - t0

    def restore_pooled(self) -> float:
        """The restore floor over a thread pool: every copy in 4 MiB pieces, as threads free up."""
        import numpy as np

        piece = 4 * MIB
        t0 = time.perf_counter()
        futures = [self._pool.submit(np.copyto, dst[a : a + piece], src[a : a + piece])
                   for dst, src in self.flat for a in range(0, dst.nbytes, piece)]
        for f in futures:
            f.result()
        return time.perf_counter() - t0

    def memmove(self) -> float:
        move = ctypes.memmove
        t0 = time.perf_counter()
        for dst, src, n in self.raw:
            move(dst, src, n)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.pairs.clear()
        self.raw.clear()
        self.flat.clear()
        self._pool.shutdown()
        self._arr = None


# -- the fsync floor ------------------------------------------------------------------------------
def write_buffered(path: Path, src: memoryview) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        off, n = 0, src.nbytes
        while off < n:
            off += os.write(fd, src[off : min(off + BLOCK, n)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def write_direct(path: Path, src: memoryview) -> float:
    """O_DIRECT writes of the 4 KiB-aligned body (src must be page-aligned), buffered tail, fsync."""
    n = src.nbytes
    body = n // 4096 * 4096
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        off = 0
        while off < body:
            off += os.pwrite(fd, src[off : min(off + BLOCK, body)], off)
        if body < n:
            os.close(fd)
            fd = os.open(path, os.O_WRONLY)
            while off < n:
                off += os.pwrite(fd, src[off:n], off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0
