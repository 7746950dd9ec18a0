"""Client side of the streamed restore (rpc Restore): copy into the state behind the daemon's read.

The daemon announces the slot it is filling (``start``), then how much of it is verified
(``ready_bytes``); this module maps the slot and lets ``Restorer`` copy each piece as soon as it
is verified, so the copy into the caller's tensors overlaps the daemon's read from disk or a peer
instead of following it. A ``restart`` (the source failed part-way) voids the copy: the state is
restored again from the next source's slot. The lease in ``done`` is always released.

Invariant: no byte is copied out of the slot before the daemon reported it verified; the call
returns only after ``done``, so a restore that returns filled the state from one source alone.
The slot is mapped ahead when the daemon prepared it for this rank (premap.py). Its mapping is
closed by a short-lived thread after the copy: unmapping 512 MiB of shared
memory tears down 131072 page entries (20-70 ms measured), which the caller need not wait for;
nothing reads the mapping after ``apply`` and no view of it escapes (copies are returned).
"""

from __future__ import annotations

import json
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
from ckptd_client.premap import RestorePremap, close_map
from ckptd_client.rpc import Connection
from ckptd_client.strict import Strictness, check_state
from ckptd_client.tree import Restorer


class _Restart(Exception):
    """The daemon rejected the source being copied; start over from the next one."""


class _Stream:
    def __init__(self, events: Iterator[pb.RestoreEvent], premap: RestorePremap | None = None) -> None:
        self.events = events
        self.premap = premap
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
                while True:  # its restart (raises _Restart) or the stream's error comes next
                    self.next_event()
            try:
                if ev.start.nbytes:  # the slot mapped ahead, if it is this one (premap.py)
                    premapped = self.premap.take(fd, ev.start.nbytes) if self.premap is not None else None
                    self.mm = premapped or mmap.mmap(fd, 0, prot=mmap.PROT_READ)
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
        if self.mm is not None:
            if background:
                threading.Thread(target=close_map, args=(self.mm,), name="ckptd-unmap", daemon=True).start()
            else:
                close_map(self.mm)
            self.mm = None


Events = tuple[pb.PrepareRestoreResponse, pb.PrepareRestoreResponse]
#: consume(buf, tensors, tree, wait): read what it needs of one source's verified shard; wait(n)
#: returns once bytes [0, n) are verified. Called again from the start after a restart.
Consumer = Callable[[Any, list[TensorEntry], dict[str, Any], Callable[[int], None]], None]


def restore_streamed(conn: Connection, request: pb.PrepareRestoreRequest, state: Any, timeout_s: float,
                     premap: RestorePremap | None = None,
                     strictness: Strictness | None = None, layouts: LayoutMemo | None = None) -> Events:
    """Fill ``state`` through rpc Restore; return (the start of the source used, done).

    ``layouts`` converts the layout once per distinct layout (a manager keeps one)."""
    def consume(buf: Any, tensors: list[TensorEntry], tree: dict[str, Any], wait: Callable[[int], None]) -> None:
        strict = strictness or Strictness(strict=False)
        check_state(tree, tensors, state, strict)  # strict restore: every mismatch named before a copy
        Restorer(buf, tensors, wait=wait, convert_dtype=strict.convert_dtype).apply(tree, state)
    return read_streamed(conn, request, consume, timeout_s, premap, layouts)


def read_streamed(conn: Connection, request: pb.PrepareRestoreRequest, consume: Consumer, timeout_s: float,
                  premap: RestorePremap | None = None, layouts: LayoutMemo | None = None) -> Events:
    """Stream one shard through rpc Restore into ``consume``; return (start of the source used, done).

    ``layouts`` converts the layout once per distinct layout (a manager keeps one)."""
    layouts = layouts if layouts is not None else LayoutMemo()
    call: Any = conn.stub.Restore(request, timeout=timeout_s)
    s = _Stream(call, premap)
    try:
        while True:
            try:
                while s.start is None:
                    s.next_event()
                start = s.start
                buf = s.mm if s.mm is not None else b""
                with warnings.catch_warnings(), gcpause.paused():
                    warnings.filterwarnings("ignore", message=".*not writable.*")
                    consume(buf, list(layouts.decode(start.layout)), json.loads(start.layout.tree_json), s.wait)
                while s.done is None:
                    s.next_event()
                return start, s.done
            except _Restart:
                continue
    finally:
        s.unmap(background=True)
        if s.done is not None and s.done.lease_id:
            conn.call(conn.stub.ReleaseRestore, pb.ReleaseRestoreRequest(lease_id=s.done.lease_id))
        else:
            call.cancel()
