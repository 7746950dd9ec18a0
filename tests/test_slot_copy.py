"""The restore's slot copier (ckptd_client/restore/slot_copy.py) and the saves' mappings it borrows.

Copies that straddle integrity chunks and the copier's pieces land exactly; a chunk that does
not match its crc32c fails the copy naming it, after every other chunk ended, also when the slot
was right and a byte went wrong on its way into the destination; with the daemon
checking, no chunk is copied before ``wait`` said its bytes are there; ``SlotMaps.borrow`` hands
out a mapping only for the very file mapped (same inode).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest
from ckptd_client.restore.slot_copy import PIECE_BYTES, ChunkVerifier, ClientVerifyFailed, SlotCopier
from ckptd_client.save.slot_maps import SlotMaps

from ckptd.core.errors import CkptdError
from ckptd.core.integrity import chunk_crcs

CHUNK = 3 * PIECE_BYTES  # several pieces per chunk, and copies that cross both kinds of boundary
NBYTES = 3 * CHUNK + 12345


def _slot(seed: int = 0) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, NBYTES, dtype=np.uint8).tobytes())


# (slot offset, length): inside one piece, across a piece boundary, across a chunk boundary,
# spanning more than a chunk, and the short last chunk's tail
COPIES = [(10, 100), (PIECE_BYTES - 7, 20), (CHUNK - 5000, 9000), (CHUNK + 17, CHUNK + 3), (NBYTES - 999, 999)]


def _copier(buf: bytearray, verifier: ChunkVerifier | None, wait=None) -> tuple[SlotCopier, list[np.ndarray]]:
    c = SlotCopier(buf, CHUNK, wait, verifier)
    dsts = [np.zeros(n, np.uint8) for _, n in COPIES]
    for (off, _), dst in zip(COPIES, dsts):
        c.add(off, dst)
    return c, dsts


def test_client_checked_copies_are_exact_and_every_touched_chunk_is_checked():
    buf = _slot()
    v = ChunkVerifier(buf, NBYTES, CHUNK, chunk_crcs(memoryview(buf), CHUNK))
    c, dsts = _copier(buf, v)
    c.run()
    for (off, n), dst in zip(COPIES, dsts):
        assert dst.tobytes() == bytes(buf[off : off + n])
    assert all(v.checked(i) for i in range(4))


def test_a_flipped_byte_fails_the_copy_naming_its_chunk_after_the_others_ended():
    buf = _slot()
    crcs = chunk_crcs(memoryview(buf), CHUNK)
    buf[CHUNK + 100] ^= 0xFF  # chunk 1
    v = ChunkVerifier(buf, NBYTES, CHUNK, crcs)
    c, dsts = _copier(buf, v)
    with pytest.raises(ClientVerifyFailed, match="chunk 1 "):
        c.run()
    assert not v.checked(1) and v.checked(0) and v.checked(2) and v.checked(3)
    off, n = COPIES[0]  # chunk 0's copy is whole: the failure did not cut other chunks short
    assert dsts[0].tobytes() == bytes(buf[off : off + n])
    with pytest.raises(ClientVerifyFailed, match="chunk 1 "):
        v.ensure([(CHUNK, CHUNK + 1)])  # a later check of the same chunk fails again


def test_a_byte_damaged_on_its_way_into_the_destination_fails_the_copy(monkeypatch: pytest.MonkeyPatch):
    buf = _slot()
    v = ChunkVerifier(buf, NBYTES, CHUNK, chunk_crcs(memoryview(buf), CHUNK))
    c, dsts = _copier(buf, v)
    copyto = np.copyto

    def lossy(dst: np.ndarray, src: np.ndarray) -> None:  # the slot is intact, one destination is not
        copyto(dst, src)
        if dst.base is dsts[3]:  # its last byte: past where COPIES[2] overlaps it
            dst[-1] ^= 0x01

    monkeypatch.setattr(np, "copyto", lossy)
    with pytest.raises(ClientVerifyFailed, match="chunk [12] "):  # COPIES[3] spans chunks 1 and 2
        c.run()


def test_ensure_checks_only_the_chunks_under_the_ranges():
    buf = _slot()
    crcs = chunk_crcs(memoryview(buf), CHUNK)
    buf[3 * CHUNK + 1] ^= 1  # the short last chunk is damaged, but nothing asks for it
    v = ChunkVerifier(buf, NBYTES, CHUNK, crcs)
    v.ensure([(5, 6), (2 * CHUNK - 1, 2 * CHUNK + 1)])
    assert [v.checked(i) for i in range(4)] == [True, True, True, False]
    assert v.covering([(0, NBYTES)]) == [3]


def test_a_crc_list_that_does_not_fit_the_shard_is_refused():
    with pytest.raises(CkptdError, match="crc32c"):
        ChunkVerifier(_slot(), NBYTES, CHUNK, [0, 0, 0])


def test_with_the_daemon_checking_no_chunk_is_copied_before_wait_returns():
    buf = _slot()
    asked: list[int] = []
    c: SlotCopier | None = None
    dsts: list[np.ndarray] = []

    def wait(n: int) -> None:  # the chunk whose bytes end at n: none of its copies has begun
        asked.append(n)
        for (off, length), dst in zip(COPIES, dsts):
            lo, hi = max(off, (n - 1) // CHUNK * CHUNK), min(off + length, n)
            if hi > lo:
                assert not dst[lo - off : hi - off].any(), f"bytes {lo}-{hi} copied before wait({n})"

    c, dsts = _copier(buf, None, wait)
    c.run()
    assert asked == sorted(asked) and asked[-1] == NBYTES and len(asked) == 4, asked
    for (off, n), dst in zip(COPIES, dsts):
        assert dst.tobytes() == bytes(buf[off : off + n])


def test_borrow_hands_out_the_mapping_of_the_same_file_only(tmp_path: Path):
    path = tmp_path / "slot"
    path.write_bytes(b"\x01" * 8192)
    maps = SlotMaps()
    try:
        mm = maps.get(str(path), 8192)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert maps.borrow(fd, 8192) is mm
            assert maps.borrow(fd, 8193) is None  # smaller than asked
        finally:
            os.close(fd)
        path.unlink()
        path.write_bytes(b"\x02" * 8192)  # same path, another file
        fd = os.open(path, os.O_RDONLY)
        try:
            assert maps.borrow(fd, 8192) is None
        finally:
            os.close(fd)
        assert isinstance(mm, mmap.mmap) and mm[:1] == b"\x01"
    finally:
        maps.close()

