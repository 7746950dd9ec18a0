"""Map this rank's next save slots before a save needs them, so a first save into a slot is steady.

Mapping a slot and faulting its page tables in (``SlotMaps.get``) costs as much as the copy
into it; a save into a slot the client has never seen pays it in the training loop's stall.
The daemon makes a rank's remaining slots (spares) in the background after its first save;
``SlotWarmer.kick(nbytes)``, called after a save that had to map a slot (so new slots may be
on their way), starts a background thread (at most one) that asks DaemonStatus for this rank's
``save_slots`` and maps the ones of at least ``nbytes`` not mapped yet (``SlotMaps.warm``, which
never evicts a mapping), polling every ``POLL_S`` until ``WAIT_S`` pass without a new one (spares
are made one after another); ``on_mapped(path)`` then lets the save path prepare its views.

Invariants: the thread reads no caller state, never closes or replaces a mapping (so it cannot
pull one from under a save's copy), and a failure only costs the head start (logged at debug
level); after ``close`` no new thread starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd_client.rpc import Connection
from ckptd_client.save.slot_maps import SlotMaps

log = logging.getLogger("ckptd_client")
POLL_S: Final = 0.05
WAIT_S: Final = 3.0


class SlotWarmer:
    """Background mapping of this rank's save slots (module docstring)."""

    def __init__(self, conn: Connection, job: str, rank: int, maps: SlotMaps,
                 on_mapped: Callable[[str], None] | None = None) -> None:
        self.conn, self.job, self.rank, self.maps = conn, job, rank, maps
        self.on_mapped = on_mapped
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.warmed = 0  # slots mapped ahead

    def kick(self, nbytes: int) -> None:
        """Map this rank's unmapped slots of at least nbytes in the background (no-op while a
        thread is already at it, or once every slot is mapped and no spare is expected)."""
        with self._lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._run, args=(nbytes,), name="ckptd-slot-warmer",
                                            daemon=True)
            self._thread.start()

    def _unmapped(self, nbytes: int) -> list[str]:
        st = self.conn.call(self.conn.stub.DaemonStatus, pb.DaemonStatusRequest())
        return [s.slot_path for s in st.save_slots if s.job == self.job and s.rank == self.rank
                and s.capacity_bytes >= nbytes and not self.maps.has(s.slot_path, s.capacity_bytes)]

    def _run(self, nbytes: int) -> None:
        try:
            deadline = time.monotonic() + WAIT_S
            while not self._closed and time.monotonic() < deadline:
                for path in self._unmapped(nbytes):
                    if self._closed or not self.maps.warm(path):
                        return
                    self.warmed += 1
                    if self.on_mapped is not None:
                        self.on_mapped(path)
                    deadline = time.monotonic() + WAIT_S  # spares are made one after another
                time.sleep(POLL_S)
        except Exception as exc:  # noqa: BLE001 - only the head start is lost
            log.debug("save slots not mapped ahead: %s", exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout=WAIT_S + 5)


__all__ = ["SlotWarmer"]
