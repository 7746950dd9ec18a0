"""recv_frames writing through the destination's file (a fresh slot): the bytes land exactly,
every verified prefix it reports is already readable through a mapping of the file, a frame
that fails its checksum is never written, and each frame is reported once checked, without
waiting for the next one."""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptd.core.errors import IntegrityError, TierFailed
from ckptd.core.integrity import chunk_crcs
from ckptd.peers.bulk import recv_frames, send_frames, verifier_for_frames

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


def test_a_verified_frame_is_reported_before_the_next_one_arrives() -> None:
    """A reader copying behind the transfer gets each frame as soon as it is checked: the sender
    here holds the second frame back until the first is reported, so a receiver that reported a
    frame only once the next one came would stall until the idle timeout."""
    chunk = MIB
    data = os.urandom(3 * chunk)
    crcs = chunk_crcs(data, chunk)
    first_reported = threading.Event()
    a, b = socket.socketpair()

    def send() -> None:
        send_frames(a, memoryview(data)[:chunk], chunk, crcs[:1], 10)
        if first_reported.wait(10):
            send_frames(a, memoryview(data)[chunk:], chunk, crcs[1:], 10, start_offset=chunk)

    def seen(n: int) -> None:
        reports.append(n)
        if n >= chunk:
            first_reported.set()

    reports: list[int] = []
    dst = bytearray(len(data))
    sender = threading.Thread(target=send)
    sender.start()
    try:
        recv_frames(b, memoryview(dst), verifier_for_frames(len(data), chunk, crcs), 3, seen)
    finally:
        a.close()
        b.close()
        sender.join(10)
    assert first_reported.is_set()
    assert bytes(dst) == data
    assert reports == [chunk, 2 * chunk, 3 * chunk]
