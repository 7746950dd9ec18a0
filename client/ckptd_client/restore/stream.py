"""Client side of the streamed restore (rpc Restore): copy into the state behind the daemon's read.

The daemon announces the slot it is filling (``start``), then how much of it is verified
(``ready_bytes``); this module maps the slot and lets ``Restorer`` copy each piece as soon as it
is verified, so the copy into the caller's tensors overlaps the daemon's read from disk or a peer
instead of following it. A ``restart`` (the source failed part-way) voids the copy: the state is
restored again from the next source's slot. The lease in ``done`` is always released, without
waiting for the answer (rpc.Connection.call_later: the connection's next call, or next restore,
waits for it).

A whole-shard restore of a state (``restore_streamed``) asks to check the slot itself
(``client_verifies``): the daemon then serves its memory copy unread, and the copy checks each
chunk's crc32c as it goes (slot_copy.py), which reads every byte once instead of twice. A
mismatch voids that copy: the restore runs again with the daemon checking, which rejects the
damaged memory copy and serves the next source.

Invariant: no byte is copied out of the slot before the daemon reported it verified, or, where
the client checks, the call does not return before every chunk matched; the call returns only
after ``done``, so a restore that returns filled the state from one source alone.
The slot is mapped ahead when the daemon prepared it for this rank (premap.py), or borrowed from
the saves' mappings when it is the memory copy of a step this client saved (slot_maps.py: no page
is faulted in again; a borrowed mapping is never closed here). Its own mapping is closed by a
short-lived thread after the copy: unmapping 512 MiB of shared
memory tears down 131072 page entries (20-70 ms measured), which the caller need not wait for;
nothing reads the mapping after ``apply`` and no view of it escapes (copies are returned).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import CkptdError, from_rpc_error
from ckptd.core.layout import TensorEntry
from ckptd.core.layout_memo import LayoutMemo
from ckptd_client import gcpause
from ckptd_client.restore.premap import RestorePremap, close_map
from ckptd_client.restore.slot_copy import ChunkVerifier, ClientVerifyFailed
from ckptd_client.restore.strict import Strictness, check_state
from ckptd_client.restore.walk import Restorer
from ckptd_client.rpc import Connection

log = logging.getLogger("ckptd_client")


class _Restart(Exception):
    """The daemon rejected the source being copied; start over from the next one."""


Borrow = Callable[[int, int], "mmap.mmap | None"]  # (fd, nbytes) -> a mapping the restore must not close


class _Stream:
    def __init__(self, events: Iterator[pb.RestoreEvent], premap: RestorePremap | None = None,
                 borrow: Borrow | None = None) -> None:
        self.events = events
        self.premap = premap
        self.borrow = borrow
        self.borrowed = False
        self.start: pb.PrepareRestoreResponse | None = None
        self.done: pb.PrepareRestoreResponse | None = None
        self.ready_bytes = 0
        self.mm: mmap.mmap | None = None

    def next_event(self) -> None:
        try:
            ev = next(self.events)
        except StopIteration:
            raise CkptdError("the daemon ended the restore stream without finishing it") from None
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        kind = ev.WhichOneof("event")
        if kind == "start":
            self.unmap()
            self.start, self.ready_bytes = ev.start, 0
            try:
                fd = os.open(ev.start.slot_path, os.O_RDONLY)
            except FileNotFoundError:  # the daemon already rejected this source and freed its slot:
                while self.done is None:  # its restart (raises _Restart) or the stream's error comes next
                    self.next_event()
                raise CkptdError(  # or the daemon served it: the file went behind its back
                    f"restore slot {ev.start.slot_path} was removed before this client could map it, while "
                    "the daemon still holds it as the memory copy (was its shm directory cleaned from "
                    "outside?); `ckptctl rm` of that step's memory copy lets a restore use the disk copy"
                ) from None
            try:
                if ev.start.nbytes:  # the slot mapped ahead, if it is this one (premap.py)
                    premapped = self.premap.take(fd, ev.start.nbytes) if self.premap is not None else None
                    borrowed = self.borrow(fd, ev.start.nbytes) if self.borrow is not None and not premapped else None
                    self.borrowed = borrowed is not None
                    self.mm = premapped or borrowed or mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        elif kind == "ready_bytes":
            self.ready_bytes = ev.ready_bytes
        elif kind == "restart":
            self.start = None
            raise _Restart(ev.restart)
        elif kind == "done":
            self.done = ev.done
            self.ready_bytes = self.start.nbytes if self.start is not None else 0

    def wait(self, end: int) -> None:
        while self.ready_bytes < end:
            if self.done is not None:
                raise CkptdError(f"restore finished with {self.ready_bytes} bytes, {end} needed")
            self.next_event()

    def unmap(self, background: bool = False) -> None:
        if self.mm is not None and self.borrowed:
            self.mm, self.borrowed = None, False  # the saves' mapping: theirs to close
        if self.mm is not None:
            if background:
                threading.Thread(target=close_map, args=(self.mm,), name="ckptd-unmap", daemon=True).start()
            else:
                close_map(self.mm)
            self.mm = None


Events = tuple[pb.PrepareRestoreResponse, pb.PrepareRestoreResponse]
#: consume(buf, tensors, tree, wait, verifier): read what it needs of one source's shard; wait(n)
#: returns once bytes [0, n) are there (verified, unless ``verifier`` is given: then the consumer
#: must have every chunk it reads checked by it before it returns). Called again from the start
#: after a restart.
Consumer = Callable[[Any, list[TensorEntry], dict[str, Any], Callable[[int], None], ChunkVerifier | None], None]


def restore_streamed(conn: Connection, request: pb.PrepareRestoreRequest, state: Any, timeout_s: float,
                     premap: RestorePremap | None = None,
                     strictness: Strictness | None = None, layouts: LayoutMemo | None = None,
                     borrow: Borrow | None = None) -> Events:
    """Fill ``state`` through rpc Restore; return (the start of the source used, done).

    ``layouts`` converts the layout once per distinct layout (a manager keeps one); ``borrow``
    finds a mapping the client already holds of the slot named (the saves')."""
    def consume(buf: Any, tensors: list[TensorEntry], tree: dict[str, Any], wait: Callable[[int], None],
                verifier: ChunkVerifier | None) -> None:
        strict = strictness or Strictness(strict=False)
        check_state(tree, tensors, state, strict)  # strict restore: every mismatch named before a copy
        Restorer(buf, tensors, wait=wait, convert_dtype=strict.convert_dtype, verifier=verifier).apply(tree, state)

    if not request.ranges:
        checked = pb.PrepareRestoreRequest()
        checked.CopyFrom(request)
        checked.client_verifies = True
        try:
            return read_streamed(conn, checked, consume, timeout_s, premap, layouts, borrow)
        except ClientVerifyFailed as exc:  # the daemon's own check decides which copy is damaged
            log.warning("restore of %s rank %d: %s; restoring again with the daemon checking",
                        request.job, request.rank, exc)
    return read_streamed(conn, request, consume, timeout_s, None, layouts, borrow)


def read_streamed(conn: Connection, request: pb.PrepareRestoreRequest, consume: Consumer, timeout_s: float,
                  premap: RestorePremap | None = None, layouts: LayoutMemo | None = None,
                  borrow: Borrow | None = None) -> Events:
    """Stream one shard through rpc Restore into ``consume``; return (start of the source used, done).

    ``layouts`` converts the layout once per distinct layout (a manager keeps one)."""
    layouts = layouts if layouts is not None else LayoutMemo()
    conn.settle()  # a previous restore's release first: its slot may be what this one needs
    call: Any = conn.stub.Restore(request, timeout=timeout_s)
    s = _Stream(call, premap, borrow)
    try:
        while True:
            try:
                while s.start is None:
                    s.next_event()
                start = s.start
                buf = s.mm if s.mm is not None else b""
                verifier = (ChunkVerifier(buf, start.nbytes, start.chunk_bytes, start.chunk_crc32c)
                            if start.client_verifies else None)
                with warnings.catch_warnings(), gcpause.paused():
                    warnings.filterwarnings("ignore", message=".*not writable.*")
                    tensors, tree = layouts.decode_with_tree(start.layout)
                    consume(buf, list(tensors), tree, s.wait, verifier)
                while s.done is None:
                    s.next_event()
                return start, s.done
            except _Restart:
                continue
    finally:
        s.unmap(background=True)
        if s.done is not None and s.done.lease_id:  # nothing reads the slot any more: no need to wait
            conn.call_later(conn.stub.ReleaseRestore, pb.ReleaseRestoreRequest(lease_id=s.done.lease_id),
                            f"releasing restore lease {s.done.lease_id}")
        else:
            call.cancel()
