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


def test_crc32c_known_answers_continuation_and_read_only_buffers() -> None:
    """The checksum is CRC-32C (Castagnoli) itself: the standard check value, RFC 3720's vectors,
    a running sum continued piece by piece, and a read-only mapping (a restore's slot) as input."""
    import mmap

    import numpy as np

    from ckptd.core.integrity import crc32c

    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    data = np.random.default_rng(7).integers(0, 256, 3 * 1024 * 1024 + 5, dtype=np.uint8)
    running = 0
    for a in range(0, data.nbytes, 1 << 20):
        running = crc32c(data[a : a + (1 << 20)], running)
    assert running == crc32c(data) == crc32c(data.tobytes())
    with mmap.mmap(-1, 8192) as m:
        m[:9] = b"123456789"
        ro = memoryview(m).toreadonly()
        assert crc32c(ro[:9]) == 0xE3069283
        ro.release()
