"""crc32c over fixed-size chunks of a shard: computed at staging, verified on every read.

A shard of n bytes has ceil(n / chunk_bytes) chunk checksums; the last chunk may be short.
Per-chunk sums let large shards be verified in parallel and by ranged reads. The crc32c package
uses the CPU's CRC32C instruction and releases the GIL; callers run these off the event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Final

import crc32c as _crc32c

from ckptd.layout import chunk_count


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
