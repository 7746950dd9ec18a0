"""crc32c over fixed-size chunks of a shard: computed at staging, verified on every read.

A shard of n bytes has ceil(n / chunk_bytes) chunk checksums; the last chunk may be short.
Per-chunk sums let large shards be verified in parallel and by ranged reads. The crc32c package
uses the CPU's CRC32C instruction and releases the GIL; callers run these off the event loop.

crc32c arithmetic: combine the checksums of adjacent pieces without reading their bytes again.

``combine(crc_a, crc_b, len_b)`` is the crc32c of ``a + b`` given only the crc32c of ``a``, the
crc32c of ``b`` and the length of ``b`` (zlib's ``crc32_combine`` method with the Castagnoli
polynomial). The peer stream verifier uses it so that one pass over each received transfer chunk
checks both the transfer chunk's own crc32c and the shard's integrity-chunk crc32c list.

Invariant: ``combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)`` for all byte strings (tested
against the ``crc32c`` package). The shift operator for a length is cached, so combining pieces of
the same few sizes costs about 32 bit steps each.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from functools import lru_cache
from typing import Final

import crc32c as _crc32c

from ckptd.core.layout import chunk_count


def crc32c(data: memoryview | bytes | bytearray) -> int:
    """crc32c of one buffer."""
    return int(_crc32c.crc32c(data))


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


POLY_REFLECTED: Final = 0x82F63B78  # Castagnoli, bit-reversed
_X0: Final = 1 << 31  # the polynomial 1 (x^0) in reflected representation


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the crc32c polynomial (reflected bit order)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ POLY_REFLECTED if b & 1 else b >> 1
    return p


def _x2n_table() -> tuple[int, ...]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return tuple(table)


_X2N: Final = _x2n_table()  # _X2N[k] = x^(2^k) mod p


@lru_cache(maxsize=256)
def _shift_operator(nbytes: int) -> int:
    """x^(8 * nbytes) mod p: appending nbytes of zeros to a message multiplies its crc by this."""
    p = _X0
    n, k = nbytes, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32c of the concatenation a + b, from crc32c(a), crc32c(b) and len(b) in bytes."""
    if len_b < 0:
        raise ValueError("len_b must not be negative")
    if len_b == 0:
        return crc_a
    return _multmodp(_shift_operator(len_b), crc_a) ^ crc_b
