"""Restore a saved tree onto the caller's live state, in place, out of a slot being filled.

The walk goes through the caller's state beside the saved tree (tree.py wrote it): tensors of
matching shape and dtype are overwritten in place, containers are updated in place, stateful
objects get ``load_state_dict`` with their current state dict updated from the checkpoint, and
anything the caller does not have yet (e.g. a fresh optimizer's empty state) is created as a copy,
never as a view into shared memory. What a strict restore refuses is checked before this walk
(strict.py); the walk itself is the lenient restore.

How the bytes are copied:
- a tensor of ``COPIER_MIN_BYTES`` or more that takes the shard's bytes as they are
  (contiguous, on the CPU, same dtype and shape) is handed to ``SlotCopier`` (slot_copy.py), which
  copies such tensors chunk by chunk over a few threads when the walk flushes;
- small tensors restored in place are copied together in one ``torch._foreach_copy_`` at a flush;
- anything else (a dtype converted, a non-contiguous or GPU tensor, a value the caller lacks) is
  copied at once, as the walk meets it.
A flush happens before any ``load_state_dict`` (it reads the values) and at the end of ``apply``.

Invariants: no byte is copied before it is ready: ``wait(n)`` (the daemon verified bytes [0, n))
and, where the client checks the slot itself, the verifier's chunks under it matched (the copier
checks as it copies, ``ensure`` before any other copy); ``apply`` at the top level returns only
after every copy is done.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from ckptd.core.layout import TensorEntry
from ckptd_client.restore import pcopy
from ckptd_client.restore.slot_copy import ChunkVerifier, SlotCopier
from ckptd_client.tree import view_of
from ckptd_client.views import BATCH_MAX_BYTES, TypedViews, copy_all

#: a tensor this large that takes the shard's bytes as they are goes to the copier: it is copied
#: over the pool, inside its chunk's fused check, instead of after the copier in the small batch
COPIER_MIN_BYTES: Final = 64 << 10


def _torch() -> Any:
    return sys.modules.get("torch")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}/{key}" if prefix else str(key)


class Restorer:
    """Apply a saved tree onto a live state (see module docstring).

    With ``wait``, the buffer is still being filled: ``wait(n)`` returns once bytes [0, n) are
    there. With ``verifier``, the client checks the slot's chunks itself (slot_copy.py).
    """

    def __init__(self, buf: Any, tensors: list[TensorEntry], wait: Callable[[int], None] | None = None,
                 piece_bytes: int = 16 * 2**20, convert_dtype: bool = False,
                 verifier: ChunkVerifier | None = None) -> None:
        self.buf = buf
        self.convert_dtype = convert_dtype  # fill a tensor of another dtype (same shape) in place, cast
        self.tensors = tensors
        self.wait = wait
        self.verifier = verifier
        self.copier = SlotCopier(buf, piece_bytes, wait, verifier)
        self._base: TypedViews | None = None  # over buf, through numpy (which holds the export)
        self._pending: list[tuple[Any, Any]] = []  # in-place torch copies, done in one batch
        self._pending_span = (-1, 0)  # the slot bytes the pending copies read: [lo, hi)

    def apply(self, node: dict[str, Any], cur: Any, path: str = "") -> Any:
        """Apply node onto cur; at the top level (path ""), every copy is done when it returns."""
        out = self._apply(node, cur, path)
        if not path:
            self._flush()
        return out

    def _ready(self, a: int, b: int) -> None:
        """Block until slot bytes [a, b) may be copied."""
        if self.wait is not None:
            self.wait(b)
        if self.verifier is not None:
            self.verifier.ensure(((a, b),))

    def _flush(self) -> None:
        """Do the copies queued so far: the copier's, then the small ones in one ``_foreach_copy_``."""
        self.copier.run()
        if self._pending:
            lo, hi = self._pending_span
            self._ready(lo, hi)
            torch = _torch()
            assert torch is not None
            dsts, srcs = zip(*self._pending)
            self._pending, self._pending_span = [], (-1, 0)
            with torch.no_grad():
                copy_all(torch, list(dsts), list(srcs))

    def _view(self, kind: str, t: TensorEntry) -> Any:
        torch = _torch()
        if kind != "t" or torch is None or not t.nbytes:
            return view_of(self.buf, kind, t)
        if self._base is None:
            self._base = TypedViews(torch, torch.from_numpy(np.frombuffer(self.buf, dtype=np.uint8)))
        return self._base.view(t)

    def _apply(self, node: dict[str, Any], cur: Any, path: str) -> Any:
        ((kind, val),) = node.items()
        if kind in ("t", "a"):
            t = self.tensors[val]
            if t.nbytes >= COPIER_MIN_BYTES:
                dst = _flat_target(t, cur, kind)
                if dst is not None:
                    self.copier.add(t.offset, dst)
                    return cur
            src = self._view(kind, t)
            torch = _torch()
            if (t.nbytes < BATCH_MAX_BYTES and kind == "t" and isinstance(cur, torch.Tensor)
                    and cur.shape == src.shape and cur.dtype == src.dtype):
                self._pending.append((cur, src))  # copied by _flush, before apply returns
                lo, hi = self._pending_span
                self._pending_span = (t.offset if lo < 0 else min(lo, t.offset), max(hi, t.offset + t.nbytes))
                return cur
            self._ready(t.offset, t.offset + t.nbytes)
            return self._tensor(src, cur, kind)
        if kind == "v":
            return val
        if kind == "f":
            return float.fromhex(val)
        if kind == "d":
            target = cur if isinstance(cur, dict) else {}
            for k, child in val:
                target[k] = self._apply(child, target.get(k), _join(path, k))
            return target
        if kind == "l":
            items = cur if isinstance(cur, list) and len(cur) == len(val) else [None] * len(val)
            for i, child in enumerate(val):
                items[i] = self._apply(child, items[i], _join(path, i))
            if isinstance(cur, list) and cur is not items:
                cur[:] = items
                return cur
            return items
        if kind == "u":
            old = cur if isinstance(cur, tuple) and len(cur) == len(val) else (None,) * len(val)
            return tuple(self._apply(c, o, _join(path, i)) for i, (c, o) in enumerate(zip(val, old)))
        if kind == "s":
            if cur is None or not callable(getattr(cur, "load_state_dict", None)):
                return self._apply(val, None, path)
            sd = self._apply(val, cur.state_dict(), path)
            self._flush()  # load_state_dict reads the values
            cur.load_state_dict(sd)
            return cur
        raise ValueError(f"{path}: unknown tree node {kind!r}")

    def _tensor(self, src: Any, cur: Any, kind: str) -> Any:
        if kind == "t":
            torch = _torch()
            assert torch is not None
            if (isinstance(cur, torch.Tensor) and cur.shape == src.shape
                    and (cur.dtype == src.dtype or self.convert_dtype)):
                with torch.no_grad():
                    cur.copy_(src)
                return cur
            return src.clone()
        if isinstance(cur, np.ndarray) and cur.shape == src.shape and cur.dtype == src.dtype and cur.flags.writeable:
            pcopy.copyto(cur, src)
            return cur
        if self.convert_dtype and isinstance(cur, np.ndarray) and cur.shape == src.shape and cur.flags.writeable:
            np.copyto(cur, src, casting="same_kind")
            return cur
        out = np.empty(src.shape, src.dtype)
        pcopy.copyto(out, src)
        return out


def _flat_target(t: TensorEntry, cur: Any, kind: str) -> np.ndarray[Any, Any] | None:
    """``cur`` as a flat uint8 array that takes entry t's bytes as they are, or None."""
    shape = tuple(t.shape)
    if kind == "t":
        torch = _torch()
        if (torch is None or not isinstance(cur, torch.Tensor) or tuple(cur.shape) != shape
                or str(cur.dtype).removeprefix("torch.") != t.dtype or not cur.is_contiguous()
                or cur.device.type != "cpu" or cur.is_conj() or cur.is_neg()):
            return None
        out: np.ndarray[Any, Any] = cur.detach().reshape(-1).view(torch.uint8).numpy()
        return out
    if not isinstance(cur, np.ndarray) or cur.shape != shape or not cur.flags.c_contiguous or not cur.flags.writeable:
        return None
    try:
        if cur.dtype != np.dtype(t.dtype):  # byte order included: a swap is not a flat copy
            return None
    except TypeError:
        return None
    return cur.reshape(-1).view(np.uint8)


__all__ = ["Restorer"]
