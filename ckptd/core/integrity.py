"""crc32c over fixed-size chunks of a shard: computed at staging, verified on every read.

A shard of n bytes has ceil(n / chunk_bytes) chunk checksums; the last chunk may be short.
Per-chunk sums let large shards be verified in parallel and by ranged reads. The sums come from
the AWS Common Runtime's checksums (awscrt): it folds 64 bytes per step with carry-less multiplies
(VPCLMULQDQ/AVX-512 where the CPU has them, the CRC32C instruction otherwise), several times the
speed of a CRC32C-instruction loop, and releases the GIL above 5 KiB; callers run these off the
event loop. It is imported at the first checksum, so a process that never checksums (most ckptctl
commands) does not load it.

``combine(crc_a, crc_b, len_b)`` is the crc32c of ``a + b`` given only the crc32c of ``a``, the
crc32c of ``b`` and the length of ``b`` (awscrt's ``combine_crc32c``). The peer stream verifier
uses it so that one pass over each received transfer chunk checks both the transfer chunk's own
crc32c and the shard's integrity-chunk crc32c list. Invariant:
``combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)`` for all byte strings (tested).

``StreamVerifier`` checks a chunk stream in one pass over the bytes: chunks must be contiguous and
in order, each chunk's crc32c must match its bytes, and the per-integrity-chunk crc32c list of the
shard (chunks of ``chunk_bytes``, as in the manifest) is rebuilt from the same per-piece sums with
crc32c combination, so no byte is read twice. ``finish`` fails unless exactly ``nbytes`` arrived.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Final

from ckptd.core.errors import IntegrityError, InvalidArgument
from ckptd.core.layout import chunk_count
from ckptd.core.types import MAX_TRANSFER_CHUNK_BYTES

_impl: tuple[Callable[[Any, int], int], Callable[[int, int, int], int]] | None = None


def _checksums() -> tuple[Callable[[Any, int], int], Callable[[int, int, int], int]]:
    global _impl
    if _impl is None:
        from awscrt import checksums  # loaded at the first checksum (module docstring)
        _impl = (checksums.crc32c, checksums.combine_crc32c)
    return _impl


def crc32c(data: Any, crc: int = 0) -> int:
    """crc32c of one contiguous buffer (bytes, memoryview, numpy array), continuing ``crc``."""
    return int((_impl or _checksums())[0](data, crc))


def chunk_crcs(buf: memoryview | bytes | bytearray, chunk_bytes: int) -> list[int]:
    """Checksums of every chunk of buf."""
    view = memoryview(buf).cast("B")
    n = view.nbytes
    return [crc32c(view[off : min(off + chunk_bytes, n)]) for off in range(0, n, chunk_bytes)]


CRC_PARTS: Final = max(1, min(4, os.cpu_count() or 1))


async def parallel_chunk_crcs(loop: asyncio.AbstractEventLoop, executor: Executor, buf: memoryview,
                              chunk_bytes: int, parts: int = CRC_PARTS) -> list[int]:
    """``chunk_crcs`` of buf split at chunk boundaries over up to ``parts`` executor threads."""
    view = buf.cast("B") if buf.format != "B" else buf
    n = view.nbytes
    per = -(-chunk_count(n, chunk_bytes) // max(1, parts)) * chunk_bytes if n else chunk_bytes
    spans = [(a, min(a + per, n)) for a in range(0, n, per)] or [(0, 0)]
    results = await asyncio.gather(*(loop.run_in_executor(executor, chunk_crcs, view[a:b], chunk_bytes)
                                     for a, b in spans))
    return [c for part in results for c in part]


def first_bad_chunk(
    buf: memoryview | bytes | bytearray,
    chunk_bytes: int,
    expected: Sequence[int],
    start_chunk: int = 0,
) -> int | None:
    """Index of the first chunk (from start_chunk) whose crc differs, or None when all match.

    A length mismatch between buf and the expected chunk count counts as a bad chunk.
    """
    view = memoryview(buf).cast("B")
    n = view.nbytes
    total = chunk_count(n, chunk_bytes)
    if total != len(expected):
        return min(total, len(expected))
    for i in range(start_chunk, total):
        off = i * chunk_bytes
        if crc32c(view[off : min(off + chunk_bytes, n)]) != expected[i]:
            return i
    return None


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32c of the concatenation a + b, from crc32c(a), crc32c(b) and len(b) in bytes."""
    if len_b < 0:
        raise ValueError("len_b must not be negative")
    if len_b == 0:
        return crc_a
    return int((_impl or _checksums())[1](crc_a, crc_b, len_b))


class StreamVerifier:
    """One-pass check of a chunk stream against a shard's size and integrity-chunk crc32c list."""

    def __init__(self, nbytes: int, chunk_bytes: int, expected: Sequence[int],
                 max_chunk_bytes: int = MAX_TRANSFER_CHUNK_BYTES) -> None:
        if chunk_bytes <= 0 or len(expected) != chunk_count(nbytes, chunk_bytes):
            raise InvalidArgument(f"chunk_crc32c does not cover {nbytes} bytes in chunks of {chunk_bytes}")
        self.nbytes = nbytes
        self.chunk_bytes = chunk_bytes
        self.expected = tuple(expected)
        self.max_chunk_bytes = max_chunk_bytes
        self.received = 0  # bytes verified so far == the next expected offset
        self._index = 0  # integrity chunk being accumulated
        self._run_crc = 0
        self._run_len = 0

    def check_next(self, offset: int, n: int) -> None:
        """Raise InvalidArgument unless [offset, offset + n) may come next (check before storing)."""
        self.check_place(offset, n, self.received)

    def check_place(self, offset: int, n: int, expected: int) -> None:
        """``check_next`` against a receiver's own position (it may run ahead of ``feed``)."""
        if offset != expected:
            raise InvalidArgument(f"chunk at offset {offset}, expected {expected} (chunks must be "
                                  "contiguous and in order)")
        if n == 0 or n > self.max_chunk_bytes:
            raise InvalidArgument(f"chunk of {n} bytes at offset {offset} (1..{self.max_chunk_bytes} allowed)")
        if offset + n > self.nbytes:
            raise InvalidArgument(f"chunk at offset {offset} of {n} bytes runs past the shard's {self.nbytes}")

    def feed(self, offset: int, data: memoryview | bytes, crc: int) -> None:
        """Verify one transfer chunk (raise InvalidArgument if malformed, IntegrityError if corrupt)."""
        n = len(data)
        self.check_next(offset, n)
        view = memoryview(data)
        pieces: list[tuple[int, int]] = []  # (crc, length) split at integrity-chunk boundaries
        pos = 0
        while pos < n:
            room = self.chunk_bytes - (offset + pos) % self.chunk_bytes
            take = min(room, n - pos)
            pieces.append((crc32c(view[pos : pos + take]), take))
            pos += take
        whole = pieces[0][0]
        for c, ln in pieces[1:]:
            whole = combine(whole, c, ln)
        if whole != crc:
            raise IntegrityError(f"crc32c mismatch in the chunk at offset {offset} ({n} bytes) "
                                 f"(got {whole:#010x}, sent {crc:#010x})")
        for c, ln in pieces:
            self._run_crc = combine(self._run_crc, c, ln) if self._run_len else c
            self._run_len += ln
            want_len = min(self.chunk_bytes, self.nbytes - self._index * self.chunk_bytes)
            if self._run_len == want_len:
                if self._run_crc != self.expected[self._index]:
                    raise IntegrityError(f"crc32c of integrity chunk {self._index} differs from the "
                                         "shard's checksum list (the source copy is corrupt)")
                self._index += 1
                self._run_len = 0
        self.received += n

    @property
    def verified_bytes(self) -> int:
        """Length of the prefix whose integrity chunks all matched the shard's checksum list."""
        return min(self._index * self.chunk_bytes, self.nbytes)

    def finish(self) -> None:
        if self.received != self.nbytes or self._index != len(self.expected):
            raise InvalidArgument(f"stream ended after {self.received} of {self.nbytes} bytes")


# -- auth --------------------------------------------------------------------------------------


def covering_chunks(ranges: Sequence[tuple[int, int]], chunk_bytes: int, nbytes: int) -> list[int]:
    """The sorted indexes of the crc32c chunks that cover byte ranges (offset, length) of a shard of
    nbytes; ValueError for a range outside the shard."""
    out: set[int] = set()
    for offset, length in ranges:
        if offset < 0 or length < 0 or offset + length > nbytes:
            raise ValueError(f"byte range [{offset}, {offset + length}) outside the shard's {nbytes} bytes")
        if length:
            out.update(range(offset // chunk_bytes, (offset + length - 1) // chunk_bytes + 1))
    return sorted(out)
