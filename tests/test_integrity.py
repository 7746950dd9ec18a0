"""The parallel checksum pass gives exactly the serial per-chunk crc32c list, for any split."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.core.integrity import chunk_crcs, first_bad_chunk, parallel_chunk_crcs

_EXECUTOR = ThreadPoolExecutor(4)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300_000), chunk=st.sampled_from([7, 4096, 65_536, 1 << 20]), parts=st.integers(1, 9))
def test_parallel_equals_serial(n: int, chunk: int, parts: int) -> None:
    data = memoryview(os.urandom(n))
    got = asyncio.run(_parallel(data, chunk, parts))
    assert got == chunk_crcs(data, chunk)
    assert first_bad_chunk(data, chunk, got) is None


async def _parallel(data: memoryview, chunk: int, parts: int) -> list[int]:
    return await parallel_chunk_crcs(asyncio.get_running_loop(), _EXECUTOR, data, chunk, parts)
