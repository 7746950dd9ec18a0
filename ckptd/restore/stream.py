"""Streamed restore: tell the client which prefix of its restore slot is already verified.

A restore used to hand the slot to the client only once the whole shard was read and verified,
so the client's copy into its tensors ran after the transfer instead of beside it. Now the
executor reports progress as it goes and the ``Restore`` RPC streams it:

- ``start``   a source was chosen and its bytes are landing in ``slot`` (the client maps it);
              ``client_verifies``: the memory tier's slot is served in place unread, and the
              client checks every chunk against the crc32c list as it copies (cheaper than
              reading every byte twice: once here, once in the client's copy);
- ``ready``   bytes ``[0, n)`` of the slot are written and matched the shard's crc32c list
              (with ``client_verifies``: written; the client's check is still to come);
- ``restart`` that source failed after a ``start``: what the client copied from it is void, a new
  ``start`` (another source, another slot) follows;
- ``done`` / ``error`` the end: the lease to release, or the typed error.

Invariants: ``ready`` never exceeds a prefix whose integrity chunks all verified (by the daemon, or,
for a ``client_verifies`` start, by the client before its restore may return), and only grows
between a ``start`` and the next ``restart``/``done``; events are produced on the event loop
(``ready_threadsafe`` hops there from a reader thread), in order, one queue per restore.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptd.core.integrity import first_bad_chunk
from ckptd.core.manifest import ShardEntry
from ckptd.core.types import TierName

if TYPE_CHECKING:
    from ckptd.memory.slots import Slot


@dataclass(frozen=True)
class RestoreEvent:
    kind: str  # "start" | "ready" | "restart" | "done" | "error"
    ready_bytes: int = 0
    tier: TierName | None = None
    slot: Slot | None = None
    entry: ShardEntry | None = None
    reason: str = ""
    error: BaseException | None = None
    client_verifies: bool = False  # a start: the client checks the chunks (nothing was read here)


class RestoreProgress:
    """The event queue of one streamed restore (create it on the event loop)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RestoreEvent] = asyncio.Queue()
        self._ready = 0
        self._started = False

    def start(self, tier: TierName, slot: Slot, entry: ShardEntry, client_verifies: bool = False) -> None:
        self._ready = 0
        self._started = True
        self.queue.put_nowait(RestoreEvent("start", tier=tier, slot=slot, entry=entry,
                                           client_verifies=client_verifies))

    def ready(self, nbytes: int) -> None:
        if self._started and nbytes > self._ready:
            self._ready = nbytes
            self.queue.put_nowait(RestoreEvent("ready", ready_bytes=nbytes))

    def ready_threadsafe(self, nbytes: int) -> None:
        self._loop.call_soon_threadsafe(self.ready, nbytes)

    def failed_source(self, reason: str) -> None:
        """The current source was rejected; void what it delivered (no-op before its start)."""
        if self._started:
            self._started = False
            self._ready = 0
            self.queue.put_nowait(RestoreEvent("restart", reason=reason))

    def done(self) -> None:
        self.queue.put_nowait(RestoreEvent("done"))

    def fail(self, exc: BaseException) -> None:
        self.queue.put_nowait(RestoreEvent("error", error=exc))


def verify_chunks(view: memoryview, entry: ShardEntry, on_verified: Callable[[int], None] | None = None) -> int | None:
    """Check ``view`` (a shard's bytes) chunk by chunk against ``entry``'s crc32c list; the index
    of the first bad chunk, or None; ``on_verified(n)`` after each good chunk (blocking)."""
    chunk = entry.chunk_bytes
    for index, off in enumerate(range(0, entry.nbytes, chunk)):
        end = min(off + chunk, entry.nbytes)
        if first_bad_chunk(view[off:end], chunk, entry.chunk_crc32c[index : index + 1]) is not None:
            return index
        if on_verified is not None:
            on_verified(end)
    return None


def verify_chunk_list(view: memoryview, entry: ShardEntry, chunks: Sequence[int]) -> int | None:
    """Check only ``chunks`` of ``view`` (a shard's bytes) against ``entry``'s crc32c list; the
    index of the first bad one, or None (a ranged restore: the other chunks are not looked at)."""
    chunk = entry.chunk_bytes
    for index in chunks:
        off = index * chunk
        end = min(off + chunk, entry.nbytes)
        if first_bad_chunk(view[off:end], chunk, entry.chunk_crc32c[index : index + 1]) is not None:
            return index
    return None
