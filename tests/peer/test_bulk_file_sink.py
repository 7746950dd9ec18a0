"""recv_frames writing through the destination's file (a fresh slot): the bytes land exactly,
every verified prefix it reports is already readable through a mapping of the file, and a frame
that fails its checksum is never written."""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.errors import IntegrityError, TierFailed
from ckptd.integrity import chunk_crcs
from ckptd.peer_bulk import recv_frames, send_frames, verifier_for_frames

MIB = 2**20


@pytest.fixture
def slot_file(tmp_path: Path) -> Iterator[tuple[Path, mmap.mmap]]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = base / f"ckptd-test-sink-{os.getpid()}.bin"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    os.posix_fallocate(fd, 0, 24 * MIB)
    mm = mmap.mmap(fd, 24 * MIB)
    os.close(fd)
    try:
        yield path, mm
    finally:
        path.unlink(missing_ok=True)  # first: a view still exported makes close() raise
        with contextlib.suppress(BufferError):
            mm.close()


def _send_until_refused(sock: socket.socket, data: bytes, chunk: int, crcs: list[int]) -> None:
    with contextlib.suppress(TierFailed):  # the receiver hangs up at the bad frame
        send_frames(sock, memoryview(data), chunk, crcs, 10)


def _transfer(data: bytes, crcs: list[int], path: Path, mm: mmap.mmap, chunk: int,
              seen: list[tuple[int, bool]]) -> None:
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: send_frames(a, memoryview(data), chunk, crcs, 10))
    sender.start()
    fd = os.open(path, os.O_WRONLY)
    try:
        verifier = verifier_for_frames(len(data), chunk, chunk_crcs(data, chunk))
        recv_frames(b, memoryview(mm)[: len(data)], verifier, 10,
                    lambda n: seen.append((n, mm[:n] == data[:n])), sink_fd=fd)
    finally:
        os.close(fd)
        a.close()
        b.close()
        sender.join(10)


def test_bytes_land_through_the_file_and_each_reported_prefix_is_in_place(
        slot_file: tuple[Path, mmap.mmap]) -> None:
    path, mm = slot_file
    chunk = MIB
    data = os.urandom(20 * MIB + 4321)
    seen: list[tuple[int, bool]] = []
    _transfer(data, chunk_crcs(data, chunk), path, mm, chunk, seen)
    assert mm[: len(data)] == data
    assert seen and seen[-1][0] == len(data)
    assert all(ok for _, ok in seen), [n for n, ok in seen if not ok]
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


def test_a_frame_failing_its_checksum_is_never_written(slot_file: tuple[Path, mmap.mmap]) -> None:
    path, mm = slot_file
    chunk = MIB
    data = os.urandom(8 * MIB)
    crcs = chunk_crcs(data, chunk)
    bad = bytearray(data)
    bad[5 * MIB + 7] ^= 0x40  # frame 5 arrives corrupted, with the true checksum
    seen: list[tuple[int, bool]] = []
    a, b = socket.socketpair()
    sender = threading.Thread(target=_send_until_refused, args=(a, bytes(bad), chunk, crcs))
    sender.start()
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(IntegrityError):
            recv_frames(b, memoryview(mm)[: len(data)], verifier_for_frames(len(data), chunk, crcs), 10,
                        lambda n: seen.append((n, True)), sink_fd=fd)
    finally:
        os.close(fd)
        a.close()
        b.close()
        sender.join(10)
    assert mm[5 * MIB : 6 * MIB] == bytes(MIB)  # the corrupted frame never reached the file
    assert mm[: 5 * MIB] == data[: 5 * MIB]
    assert not seen or seen[-1][0] <= 5 * MIB
