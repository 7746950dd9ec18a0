"""Map the slot this rank's restore will read before the restore asks for it.

A restore copies out of a daemon slot: the memory copy of the newest step (a trainer that
crashed), or a slot the daemon prepared as it started on a replacement node, which the restore
fills from a peer (ckptd/restore/prep.py). Mapping that slot when the restore starts makes the
copy fault the mapping in, 16 pages per fault: 0.04 CPU-s of the client's 0.14 for a 512 MiB
restore from a peer, measured, on a host where the daemons want the same cores. ``RestorePremap``
does that work while the trainer starts instead: a background thread asks DaemonStatus for this
rank's ``restore_slots`` (polling while the daemon is still preparing, up to ``timeout_s``),
maps them read-only with MAP_POPULATE, and ``take(fd)`` hands the mapping to the restore whose
``start`` event names that very file.

Invariants: a mapping is handed out at most once, and only for the file it maps (same device and
inode, at least as large as asked); once a restore asked, nothing more is mapped ahead (it
waits for a mapping under way rather than fault the slot in beside it); slots are never
truncated, so a mapping made early stays valid whatever the daemon later does with the slot; one
never handed out is closed by ``close`` (the manager calls it after its first restore or save,
and when it closes), so a trainer that does not restore does not keep the slot's memory mapped;
the thread is a daemon thread, reads no caller state, and a failure costs only the head start
(logged at debug level).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from typing import Final

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd_client.rpc import Connection

log = logging.getLogger("ckptd_client")
POLL_S: Final = 0.05
MAP_WAIT_S: Final = 5.0  # a restore waits this long at most for a mapping under way


def close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view still alive (e.g. in a traceback): the GC unmaps it
        pass


class RestorePremap:
    """The slots this rank's restore would read, mapped in the background (module docstring)."""

    def __init__(self, conn: Connection, job: str, rank: int, timeout_s: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._maps: dict[tuple[int, int], mmap.mmap] = {}
        self._closed = False
        self._mapping = False  # the thread is mapping a slot now
        self._done = threading.Event()
        self.taken = 0  # mappings handed to a restore
        self._thread = threading.Thread(target=self._run, args=(conn, job, rank, timeout_s),
                                        name="ckptd-premap", daemon=True)
        self._thread.start()

    def _run(self, conn: Connection, job: str, rank: int, timeout_s: float) -> None:
        try:
            deadline = time.monotonic() + timeout_s
            while not self._closed:
                st = conn.call(conn.stub.DaemonStatus, pb.DaemonStatusRequest())
                paths = [s.slot_path for s in st.restore_slots if s.job == job and s.rank == rank]
                if paths or not st.preparing_restore or time.monotonic() >= deadline:
                    break
                time.sleep(POLL_S)
            else:
                return
            for path in paths:
                self._map(path)
        except Exception as exc:  # noqa: BLE001 - only the head start is lost
            log.debug("restore slot not mapped ahead: %s", exc)
        finally:
            self._done.set()

    def _map(self, path: str) -> None:
        with self._lock:
            if self._closed:  # a restore started meanwhile: it maps the slot itself
                return
            self._mapping = True
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            finally:
                os.close(fd)
            with self._lock:
                if not self._closed:
                    self._maps[(st.st_dev, st.st_ino)] = mm
                    return
            close_map(mm)
        finally:
            with self._lock:
                self._mapping = False

    def wait(self, timeout_s: float) -> bool:
        """Wait for the background mapping to finish; whether a slot is mapped and not yet taken."""
        self._done.wait(timeout_s)
        with self._lock:
            return bool(self._maps)

    def take(self, fd: int, nbytes: int) -> mmap.mmap | None:
        """The mapping of the file ``fd`` is open on, if it was mapped ahead (at most once). A
        mapping under way is waited for (it replaces the faults the caller would take); after
        this call nothing more is mapped ahead, so the work is never done twice."""
        st = os.fstat(fd)
        if self._mapping:
            self._done.wait(MAP_WAIT_S)
        with self._lock:
            self._closed = True
            mm = self._maps.pop((st.st_dev, st.st_ino), None)
        if mm is not None and len(mm) < nbytes:
            close_map(mm)
            return None
        self.taken += mm is not None
        return mm

    def close(self) -> None:
        """Unmap what was not taken; the thread, if still running, maps nothing more."""
        with self._lock:
            self._closed = True
            maps, self._maps = list(self._maps.values()), {}
        for mm in maps:
            close_map(mm)


__all__ = ["RestorePremap", "close_map"]
