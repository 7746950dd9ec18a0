"""ckptd_client.restore.pcopy: large numpy copies over a few threads are exact, and everything it cannot
split (small, strided, byte-swapped, read-only) behaves exactly like np.copyto."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
from ckptd_client.restore import pcopy

MIB = 2**20


@pytest.mark.parametrize("nbytes", [pcopy.MIN_PARALLEL_BYTES, 3 * pcopy.PIECE_BYTES + 12345, 37 * MIB + 8])
@pytest.mark.parametrize("dtype", ["uint8", "float32", "int64", "complex128"])
def test_large_copies_are_exact(nbytes: int, dtype: str) -> None:
    item = np.dtype(dtype).itemsize
    src = np.frombuffer(np.random.default_rng(nbytes).bytes(nbytes // item * item), dtype=dtype)
    dst = np.zeros_like(src)
    pcopy.copyto(dst, src)
    assert dst.tobytes() == src.tobytes()


def test_the_pieces_run_on_the_pool_when_it_has_threads() -> None:
    if pcopy.THREADS == 1:
        pytest.skip("one cpu: every copy stays on the caller")
    src = np.arange(4 * pcopy.PIECE_BYTES, dtype=np.uint8)
    dst = np.empty_like(src)
    seen: set[str] = set()
    real = np.copyto

    def spy(d: np.ndarray, s: np.ndarray, **kw: object) -> None:
        seen.add(threading.current_thread().name)
        real(d, s, **kw)  # type: ignore[arg-type]

    np.copyto = spy  # type: ignore[assignment]
    try:
        pcopy.copyto(dst, src)
    finally:
        np.copyto = real
    assert np.array_equal(dst, src)
    assert seen and all(name.startswith("ckptd-copy") for name in seen)


def test_what_it_cannot_split_is_plain_copyto() -> None:
    n = 4 * pcopy.PIECE_BYTES // 4
    big = np.arange(2 * n, dtype=np.float32)
    strided = np.empty(n, dtype=np.float32)
    pcopy.copyto(strided, big[::2])  # a strided source
    assert np.array_equal(strided, big[::2])
    swapped = np.arange(n, dtype=">f4")
    native = np.empty(n, dtype="<f4")
    pcopy.copyto(native, swapped)  # byte order converted, not copied raw
    assert np.array_equal(native, np.arange(n, dtype=np.float32))
    small = np.arange(10, dtype=np.int16)
    out = np.empty_like(small)
    pcopy.copyto(out, small)
    assert np.array_equal(out, small)


def test_errors_surface_like_copyto() -> None:
    src = np.ones(4 * pcopy.PIECE_BYTES, dtype=np.uint8)
    ro = np.zeros_like(src)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        pcopy.copyto(ro, src)
    with pytest.raises(ValueError):
        pcopy.copyto(np.zeros(3, dtype=np.uint8), np.zeros(4, dtype=np.uint8))


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork")
def test_a_forked_child_gets_its_own_pool() -> None:
    src = np.arange(4 * pcopy.PIECE_BYTES, dtype=np.uint8)
    pcopy.copyto(np.empty_like(src), src)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: copying must neither hang on the parent's dead threads nor fail
        try:
            dst = np.empty_like(src)
            pcopy.copyto(dst, src)
            os._exit(0 if np.array_equal(dst, src) else 1)
        except BaseException:  # noqa: BLE001 - a child must never return into pytest
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
