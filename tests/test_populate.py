"""ckptd.core.populate: a slot's pages faulted in while the process's other threads run on.

One ``mmap.madvise(MADV_POPULATE_WRITE)`` over a whole slot held the GIL for its length, so a
thread populating a slot in the background stopped the daemon's event loop or a trainer's
training thread as long. ``populate`` goes in steps through a call that releases the GIL: here
another thread never waits more than half the populate, and the pages are all there afterwards.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import uuid
from pathlib import Path

from ckptd.core.populate import populate

MiB = 1 << 20


def _resident_bytes(path: Path) -> int:
    """Bytes of this process's mapping of path present in its page tables (/proc/self/smaps Rss)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.endswith(str(path)) or line.endswith(f"{path} (deleted)"))
    rss = next(line for line in lines[i + 1:] if line.startswith("Rss:"))
    return int(rss.split()[1]) * 1024


def test_another_thread_runs_while_a_slot_is_populated() -> None:
    path = Path("/dev/shm") / f"ckptd-test-populate-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, 256 * MiB)
        mm = mmap.mmap(fd, 256 * MiB)
    finally:
        os.close(fd)
    try:
        window: list[float] = []

        def run() -> None:
            window.append(time.perf_counter())
            assert populate(mm, step_bytes=16 * MiB)
            window.append(time.perf_counter())

        t = threading.Thread(target=run)
        ticks: list[float] = []
        t.start()
        while t.is_alive():
            ticks.append(time.perf_counter())
        t.join()
        start, end = window
        inside = [start, *(x for x in ticks if start < x < end), end]
        longest_wait_s = max(b - a for a, b in zip(inside, inside[1:]))
        assert longest_wait_s < (end - start) / 2, (longest_wait_s, end - start)
        assert _resident_bytes(path) == 256 * MiB
        assert not populate(mm, cancelled=lambda: True)  # a cancelled populate stops before its first step
    finally:
        mm.close()
        path.unlink()
