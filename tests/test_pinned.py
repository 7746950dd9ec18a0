"""Pinned slot mappings (client/ckptd_client/save/pinned.py): on a host without CUDA nothing is
pinned and the reason is given; a registration the driver refuses, or one past the budget, leaves
the slot pageable with a warning, never an error; on a CUDA host a real slot mapping is
page-locked once, counted, copied into from the device, and unregistered when dropped."""

from __future__ import annotations

import logging
import mmap
from typing import Any

import pytest
import torch
from ckptd_client.save.pinned import PinnedSlots

MiB = 2**20


class _RefusingCudart:
    """cudart whose cudaHostRegister fails as a driver out of lockable memory does (error code 2)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.calls.append((ptr, nbytes, flags))
        return 2

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        raise AssertionError("nothing was registered")


class _CudaThatRefuses:
    """torch with a CUDA device whose driver refuses to pin (below the real GPU test)."""

    def __init__(self) -> None:
        self.rt = _RefusingCudart()
        self.cuda = self

    def is_available(self) -> bool:
        return True

    def cudart(self) -> Any:
        return self.rt


def _slot(nbytes: int) -> tuple[mmap.mmap, Any]:
    mm = mmap.mmap(-1, nbytes)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def test_no_cuda_means_not_used_with_the_reason() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-CUDA path does not apply")
    p = PinnedSlots()
    assert p.usable() == (False, "no CUDA device")
    mm, base = _slot(MiB)
    assert p.ensure("slot-a", base) is False
    assert p.pinned_bytes == 0 and p.registered == {}
    p.close()
    del base
    mm.close()


def test_zero_budget_is_not_used() -> None:
    assert PinnedSlots(budget_bytes=0).usable() == (False, "pinned-memory budget is 0")


def test_refused_registration_warns_and_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    fake = _CudaThatRefuses()
    p = PinnedSlots(torch=fake)
    mm, base = _slot(2 * MiB)
    with caplog.at_level(logging.WARNING, logger="ckptd_client"):
        assert p.ensure("slot-a", base) is False
        assert p.ensure("slot-a", base) is False  # refused once: not asked again, one warning
    assert fake.rt.calls == [(base.data_ptr(), 2 * MiB, 1)]
    assert p.pinned_bytes == 0 and "returned 2" in p.refused["slot-a"]
    assert len([r for r in caplog.records if "stays pageable" in r.getMessage()]) == 1
    p.forget("slot-a")  # forgetting a slot never pinned unregisters nothing
    del base
    mm.close()


def test_budget_refuses_before_the_driver_is_asked(caplog: pytest.LogCaptureFixture) -> None:
    fake = _CudaThatRefuses()
    p = PinnedSlots(budget_bytes=MiB, torch=fake)
    mm, base = _slot(2 * MiB)
    with caplog.at_level(logging.WARNING, logger="ckptd_client"):
        assert p.ensure("slot-a", base) is False
    assert fake.rt.calls == [] and "budget" in p.refused["slot-a"]
    del base
    mm.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the page-locked path needs one")
def test_cuda_slot_is_pinned_once_counted_and_unregistered() -> None:
    p = PinnedSlots(budget_bytes=64 * MiB)
    mm, base = _slot(16 * MiB)
    assert p.ensure("slot-a", base) and p.ensure("slot-a", base)
    assert p.pinned_bytes == 16 * MiB and p.register_s > 0
    src = torch.arange(4 * MiB, dtype=torch.float32, device="cuda")
    base.view(torch.float32).copy_(src)
    assert torch.equal(base.view(torch.float32), src.cpu())
    p.forget("slot-a")
    assert p.pinned_bytes == 0
    del base
    mm.close()
