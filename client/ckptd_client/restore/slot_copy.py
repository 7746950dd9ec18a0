"""Copy a restored shard's large tensors out of the slot over a few threads, checking chunks as it goes.

Job: ``SlotCopier`` collects the flat byte copies of one restore (``add``: a destination that takes
the shard's bytes as they are, same dtype and shape, contiguous) while the tree walk runs, and
does them in ``run``, one integrity chunk per task, handed to pcopy's small thread pool as threads
free up. A core shared with other work (the daemon reading the shard, the trainer's own threads)
then slows only the tasks it runs, where a copy split evenly over the threads waits for the
slowest one.

Who checks the bytes:
- the daemon (a disk, peer or object read, or a ranged restore): ``run`` hands a chunk to a thread
  only once ``wait`` says the daemon has verified the bytes it needs, so the copy follows the read;
- the client (``ChunkVerifier``: the memory tier's slot served in place, unread): a chunk not yet
  checked is read once, ``PIECE_BYTES`` at a time: the piece is copied, then the crc32c is taken
  over its bytes where they landed (the destinations, and the slot itself between them where
  nothing copies it), while they are still in the core's cache. That costs little more than the
  copy alone, where a check by the daemon followed by the client's copy reads every byte twice,
  and it checks the bytes the caller gets, not only the ones it was copied from.

Invariants: ``run`` returns only after every task ended; a chunk whose crc32c does not match makes
it raise ``ClientVerifyFailed`` (naming the chunk) after the others ended: bytes of that chunk may
already be in the caller's state, and the caller must restore again with the daemon checking
(restore_stream.py does), which overwrites every byte; ``ChunkVerifier.ensure`` checks the chunks
under byte ranges that another copy is about to read; each chunk's crc32c is computed once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Final

import numpy as np

from ckptd.core.errors import CkptdError, IntegrityError
from ckptd.core.integrity import crc32c
from ckptd.core.layout import chunk_count
from ckptd_client.restore import pcopy

PIECE_BYTES: Final = 512 << 10  # copied then checked while in a core's cache (L2 holds it twice)


class ClientVerifyFailed(IntegrityError):
    """A chunk of a slot the client checks did not match its crc32c: restore again, the daemon checking."""


class ChunkVerifier:
    """The crc32c list of a slot the client checks, and which of its chunks were checked so far."""

    def __init__(self, buf: Any, nbytes: int, chunk_bytes: int, crcs: Sequence[int]) -> None:
        if chunk_bytes <= 0 or len(crcs) != chunk_count(nbytes, chunk_bytes):
            raise CkptdError(f"restore start: {len(crcs)} crc32c for {nbytes} bytes in chunks of {chunk_bytes}")
        self.buf = memoryview(buf) if nbytes else memoryview(b"")
        self.nbytes = nbytes
        self.chunk_bytes = chunk_bytes
        self.crcs = list(crcs)
        self._done = bytearray(len(self.crcs))  # 1: checked and matched

    def span(self, index: int) -> tuple[int, int]:
        """Bytes [a, b) of chunk ``index``."""
        a = index * self.chunk_bytes
        return a, min(a + self.chunk_bytes, self.nbytes)

    def checked(self, index: int) -> bool:
        return bool(self._done[index])

    def covering(self, ranges: Sequence[tuple[int, int]]) -> list[int]:
        """The chunks not yet checked under byte ranges [a, b)."""
        out: set[int] = set()
        for a, b in ranges:
            if b > a:
                out.update(i for i in range(a // self.chunk_bytes, (b - 1) // self.chunk_bytes + 1)
                           if not self._done[i])
        return sorted(out)

    def check(self, index: int, copy_piece: Callable[[int, int], list[Any]] | None = None) -> None:
        """Check chunk ``index`` piece by piece; raises ClientVerifyFailed on a mismatch.

        ``copy_piece(a, b)`` copies what the restore takes of slot bytes [a, b) and returns the
        buffers that hold those bytes now, in slot order and covering [a, b) exactly: the crc32c
        is taken over them. Without it the slot's own bytes are checked."""
        a, b = self.span(index)
        crc = 0
        for p in range(a, b, PIECE_BYTES):
            q = min(p + PIECE_BYTES, b)
            if copy_piece is None:
                crc = crc32c(self.buf[p:q], crc)
                continue
            for part in copy_piece(p, q):
                crc = crc32c(part, crc)
        if crc != self.crcs[index]:
            raise ClientVerifyFailed(f"restore slot: crc32c mismatch in chunk {index} (bytes {a}-{b})")
        self._done[index] = 1

    def ensure(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Check every chunk under ``ranges`` not checked yet (over the pool when several)."""
        todo = self.covering(ranges)
        if len(todo) > 1:
            _wait_all([pcopy.executor().submit(self.check, i) for i in todo])
        elif todo:
            self.check(todo[0])


# one copy: slot bytes [offset, offset + n) into dst[dst_offset : dst_offset + n] (dst: flat uint8)
_Part = tuple[int, int, np.ndarray[Any, Any], int]


class SlotCopier:
    """The flat copies of one restore, done chunk by chunk over a pool (module docstring)."""

    def __init__(self, buf: Any, chunk_bytes: int, wait: Callable[[int], None] | None = None,
                 verifier: ChunkVerifier | None = None) -> None:
        self.src = np.frombuffer(buf, dtype=np.uint8) if len(buf) else np.empty(0, np.uint8)
        self.chunk_bytes = verifier.chunk_bytes if verifier is not None else max(1, chunk_bytes)
        self.wait = wait
        self.verifier = verifier
        self._parts: dict[int, list[_Part]] = {}

    def add(self, offset: int, dst: np.ndarray[Any, Any]) -> None:
        """Copy slot bytes [offset, offset + dst.nbytes) into ``dst`` (flat uint8) at ``run``."""
        n, done = dst.nbytes, 0
        while done < n:
            index = (offset + done) // self.chunk_bytes
            take = min(n - done, (index + 1) * self.chunk_bytes - offset - done)
            self._parts.setdefault(index, []).append((offset + done, take, dst, done))
            done += take

    def run(self) -> None:
        """Do every copy added so far; see the module docstring for who checks the bytes."""
        parts, self._parts = self._parts, {}
        if not parts:
            return
        pool = pcopy.executor()
        futures: list[Future[None]] = []
        try:
            for index in sorted(parts):
                chunk = sorted(parts[index], key=lambda p: p[0])
                if self.wait is not None:
                    self.wait(max(o + n for o, n, _, _ in chunk))
                futures.append(pool.submit(self._chunk, index, chunk))
        finally:
            _wait_all(futures)

    def _chunk(self, index: int, chunk: list[_Part]) -> None:
        v = self.verifier
        if v is None or v.checked(index):
            for off, n, dst, d in chunk:
                np.copyto(dst[d : d + n], self.src[off : off + n])
            return
        first = 0  # chunk[first:] are the parts not wholly copied yet (sorted by offset)

        def copy_piece(a: int, b: int) -> list[Any]:  # copy the parts' bytes inside [a, b)
            nonlocal first
            landed: list[Any] = []  # where bytes [a, b) are now, in slot order, each byte once
            pos = a
            for off, n, dst, d in itertools.islice(chunk, first, None):
                if off >= b:
                    break
                lo, hi = max(off, a), min(off + n, b)
                if hi <= lo:
                    continue
                out = dst[d + lo - off : d + hi - off]
                np.copyto(out, self.src[lo:hi])
                if hi > pos:  # (parts of a layout never overlap; a copy added twice may)
                    if lo > pos:
                        landed.append(self.src[pos:lo])  # between two copies: nothing copies it
                    landed.append(out[max(0, pos - lo):])
                    pos = hi
            while first < len(chunk) and chunk[first][0] + chunk[first][1] <= b:
                first += 1
            if pos < b:
                landed.append(self.src[pos:b])
            return landed

        v.check(index, copy_piece)


def _wait_all(futures: Sequence[Future[None]]) -> None:
    """Wait until every task ended; then raise the first error (a mismatch before other errors)."""
    for f in futures:
        f.exception()
    errors = [e for f in futures if (e := f.exception()) is not None]
    for e in errors:
        if isinstance(e, ClientVerifyFailed):
            raise e
    if errors:
        raise errors[0]


__all__ = ["PIECE_BYTES", "ChunkVerifier", "ClientVerifyFailed", "SlotCopier"]
