"""Page-locked (pinned) slot mappings for states on a CUDA device.

A device-to-host ``copy_`` into pageable memory is staged by the driver through its own small
pinned buffer, at a fraction of the link's speed; into page-locked memory it is one DMA. A slot
mapping is registered with CUDA once (``cudaHostRegister`` through ``torch.cuda.cudart()``) the
first time a save of a state holding CUDA tensors copies into it, kept registered across saves,
and unregistered before the mapping is closed (``forget``, chained to ``SlotMaps.on_drop``) and at
``close``. Registration is what makes a mapping's pages resident and locked: it costs time once
per slot (``register_s``), and the locked bytes (``pinned_bytes``) count against
``budget_bytes``.

``PinnedSlots.usable()`` says whether pinning applies, and why not: no torch, no CUDA device, or
the budget is 0. A registration that fails (the driver refuses, RLIMIT_MEMLOCK, the budget is
spent) logs one warning naming the reason and the slot stays pageable: the save goes on, slower,
never crashes.

Invariants: a registered pointer is unregistered exactly once, before its mapping can be closed;
``pinned_bytes`` is the sum of the sizes registered and not yet unregistered, never above
``budget_bytes``; nothing here runs, or imports torch.cuda, on a host without CUDA.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

log = logging.getLogger("ckptd_client")

CUDA_HOST_REGISTER_PORTABLE = 1  # the pinning is seen by every CUDA context of the process


class PinnedSlots:
    """Slot mappings registered with CUDA, once each (module docstring)."""

    def __init__(self, budget_bytes: int | None = None, torch: Any = None) -> None:
        self.budget_bytes = budget_bytes  # None: no limit beyond the slots themselves
        self._torch = torch
        self._lock = threading.Lock()
        self.registered: dict[str, tuple[int, int]] = {}  # slot path -> (pointer, bytes)
        self.refused: dict[str, str] = {}  # slot path -> why it stays pageable
        self.register_s = 0.0  # seconds spent registering, all slots together
        self._reason: str | None = None
        self._checked = False

    def _torch_mod(self) -> Any:
        return self._torch if self._torch is not None else sys.modules.get("torch")

    def usable(self) -> tuple[bool, str]:
        """(True, "") where slots can be pinned, else (False, why not); checked once torch is
        imported (a state of CUDA tensors imports it)."""
        if not self._checked:
            torch = self._torch_mod()
            if self.budget_bytes == 0:
                self._reason = "pinned-memory budget is 0"
            elif torch is None:
                return False, "torch is not imported"
            elif not torch.cuda.is_available():
                self._reason = "no CUDA device"
            self._checked = True
        return self._reason is None, self._reason or ""

    @property
    def pinned_bytes(self) -> int:
        return sum(n for _, n in self.registered.values())

    def ensure(self, path: str, base: Any) -> bool:
        """Register the mapping under ``base`` (a uint8 tensor over the whole slot mapping) once;
        True when it is page-locked now. Failure: one warning, False, the slot stays pageable."""
        ok, why = self.usable()
        if not ok or base is None:
            return False
        with self._lock:
            if path in self.registered:
                return True
            if path in self.refused:
                return False
            nbytes = int(base.numel())
            if self.budget_bytes is not None and self.pinned_bytes + nbytes > self.budget_bytes:
                return self._refuse(path, f"pinning {nbytes} bytes would pass the budget of "
                                          f"{self.budget_bytes} ({self.pinned_bytes} pinned)")
            ptr = int(base.data_ptr())
            t0 = time.perf_counter()
            try:
                err = self._torch_mod().cuda.cudart().cudaHostRegister(ptr, nbytes, CUDA_HOST_REGISTER_PORTABLE)
            except Exception as exc:  # noqa: BLE001 - a driver that cannot pin: fall back
                return self._refuse(path, f"cudaHostRegister raised {exc!r}")
            self.register_s += time.perf_counter() - t0
            code = int(getattr(err, "value", err))
            if code != 0:
                return self._refuse(path, f"cudaHostRegister returned {err}")
            self.registered[path] = (ptr, nbytes)
            return True

    def _refuse(self, path: str, why: str) -> bool:
        self.refused[path] = why
        log.warning("ckptd: slot %s stays pageable (device-to-host copies will be slower): %s", path, why)
        return False

    def forget(self, path: str) -> None:
        """Unregister path's mapping (before it is closed); a no-op for one never pinned."""
        with self._lock:
            self.refused.pop(path, None)
            entry = self.registered.pop(path, None)
            if entry is None:
                return
            try:
                self._torch_mod().cuda.cudart().cudaHostUnregister(entry[0])
            except Exception as exc:  # noqa: BLE001 - the mapping goes anyway
                log.warning("ckptd: cudaHostUnregister of slot %s failed: %s", path, exc)

    def close(self) -> None:
        for path in list(self.registered):
            self.forget(path)


def holds_cuda(leaves: Any) -> bool:
    """Whether any torch leaf of a plan lives on a CUDA device."""
    return any(leaf.kind == "t" and leaf.obj.is_cuda for leaf in leaves)


__all__ = ["PinnedSlots", "holds_cuda"]
