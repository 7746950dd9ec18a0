"""Prepare a rank's save slots before its first save (``CheckpointManager.prepare_save``).

A first save into a slot pays for the slot's memory: the daemon makes the file, every page is
faulted in (and zeroed) on first touch, and the client maps it and builds its page tables, many
times the copy itself (docs/architecture.md, "Where the time goes", has the figures).
``SavePreparer.start(nbytes)`` moves all of it off the training loop: a
background thread asks the daemon to make this rank's slots for a shard of ``nbytes``
(PrepareSave: made and faulted in by the daemon, within its budget's free room, never more than
the rank's saves use), then maps and populates each here (``SlotMaps.warm``) and builds the copy
views of the current layout over it (``on_mapped``). It returns a ``SavePreparation`` at once.

Invariants: one preparation runs at a time per manager; ``start`` while one runs for the same
size returns it (idempotent; a finished one is cheap to repeat: the daemon and the maps already
hold the slots). A save arriving meanwhile never does the work twice: the daemon hands it the
slot being made and ``SlotMaps.get`` waits for a mapping under way, each begun earlier than the
save would begin its own. A failure is logged (warning) and kept in ``error`` (``wait`` raises
it); the save path is unaffected and does the work itself. ``close`` cancels the RPC, stops the
thread within one populate step and adds no mapping after (``SlotMaps.close`` unmaps the rest);
the slots stay the daemon's, free, as spares do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import CkptdError, DaemonUnavailable, from_rpc_error
from ckptd_client.rpc import Connection
from ckptd_client.save.slot_maps import SlotMaps

log = logging.getLogger("ckptd_client")
RPC_TIMEOUT_S = 600.0  # the daemon makes the slots one after another (seconds per GiB at worst)


class SavePreparation:
    """One ``prepare_save``: its progress, and its error if it failed (module docstring)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.slots_wanted = 0  # as the daemon resolved it
        self.slots_ready = 0  # slots of at least nbytes the daemon holds for this rank
        self.slots_mapped = 0  # of those, mapped here (by this preparation or earlier)
        self.seconds = 0.0  # from start to done
        self.error: CkptdError | None = None
        self._done = threading.Event()

    @classmethod
    def skipped(cls, why: str, nbytes: int = 0) -> SavePreparation:
        """A preparation that did nothing, done at once (``error`` says why)."""
        prep = cls(nbytes)
        prep.error = CkptdError(why)
        prep._done.set()
        return prep

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the preparation is done (True) or ``timeout_s`` passed (False); raise its
        error (e.g. BudgetExhausted: the shard does not fit the daemon's budget) if it failed."""
        if not self._done.wait(timeout_s):
            return False
        if self.error is not None:
            raise self.error
        return True


class SavePreparer:
    """The background preparation of one manager's save slots (module docstring)."""

    def __init__(self, conn: Connection, job: str, rank: int, world_size: int, maps: SlotMaps,
                 on_mapped: Callable[[str], None] | None = None) -> None:
        self.conn, self.job, self.rank, self.world_size, self.maps = conn, job, rank, world_size, maps
        self.on_mapped = on_mapped
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._call: Any = None  # the PrepareSave call in flight (a grpc future), cancelled by close
        self.current: SavePreparation | None = None

    def start(self, nbytes: int, slots: int = 0) -> SavePreparation:
        with self._lock:
            cur = self.current
            if cur is not None and not cur.done and cur.nbytes == nbytes:
                return cur
            if self._closed:
                return SavePreparation.skipped("the manager is closed", nbytes)
            if cur is not None and not cur.done:  # another size: the save path copes
                return SavePreparation.skipped(f"a preparation for {cur.nbytes} bytes is still running", nbytes)
            if self._thread is not None:
                self._thread.join()  # done: the thread is only returning
            prep = self.current = SavePreparation(nbytes)
            self._thread = threading.Thread(target=self._run, args=(prep, slots), name="ckptd-save-prep",
                                            daemon=True)
            self._thread.start()
            return prep

    def _run(self, prep: SavePreparation, slots: int) -> None:
        t0 = time.perf_counter()
        try:
            with self._lock:
                if self._closed:
                    raise DaemonUnavailable("the manager closed during the preparation")
                self._call = self.conn.stub.PrepareSave.future(pb.PrepareSaveRequest(
                    job=self.job, rank=self.rank, world_size=self.world_size, nbytes=prep.nbytes, slots=slots),
                    timeout=RPC_TIMEOUT_S)
            try:
                resp = self._call.result()
            except grpc.FutureCancelledError:
                raise DaemonUnavailable("the manager closed during the preparation") from None
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            prep.slots_wanted, prep.slots_ready = resp.slots_wanted, len(resp.slots)
            for s in resp.slots:
                if self._closed or not self.maps.warm(s.slot_path):
                    break
                prep.slots_mapped += 1
                if self.on_mapped is not None:
                    self.on_mapped(s.slot_path)
            if prep.slots_ready < prep.slots_wanted:
                log.info("ckptd: %d of %d save slots prepared for %s rank %d (no free room left in the budget)",
                         prep.slots_ready, prep.slots_wanted, self.job, self.rank)
        except CkptdError as exc:
            prep.error = exc
            log.warning("ckptd: save slots of %s rank %d not prepared: %s", self.job, self.rank, exc)
        except Exception as exc:  # noqa: BLE001 - the save path does the work itself
            prep.error = CkptdError(f"preparing save slots failed: {exc!r}")
            log.warning("ckptd: save slots of %s rank %d not prepared: %r", self.job, self.rank, exc)
        finally:
            prep.seconds = time.perf_counter() - t0
            prep._done.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            call, thread = self._call, self._thread
        if call is not None:
            call.cancel()
        if thread is not None:
            thread.join(timeout=30)


__all__ = ["SavePreparation", "SavePreparer"]
