"""Flatten a training state into tensors + a typed JSON tree, and restore it in place.

Accepted: nested dicts (str/int keys), lists, tuples; torch tensors (every dtype in
``ckptd.core.types.DTYPE_ITEMSIZE``, non-contiguous, 0-d, empty, any device); numpy arrays;
int/float/str/bool/None; and any object with ``state_dict()``/``load_state_dict()`` (model,
optimizer, LR scheduler). Anything else raises TypeError naming its key. Nothing is pickled.

Restore walks the caller's state beside the saved tree: tensors of matching shape and dtype are
overwritten in place (``copy_``), containers are updated in place, stateful objects get
``load_state_dict`` with their current state dict updated from the checkpoint, and anything the
caller does not have yet (e.g. a fresh optimizer's empty state) is created as a copy, never as a
view into shared memory. What a strict restore refuses is checked before this walk (strict.py);
the walk itself is the lenient restore.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptd.core.layout import TensorEntry, align_up
from ckptd.core.types import DTYPE_ITEMSIZE
from ckptd_client import pcopy
from ckptd_client.views import BATCH_MAX_BYTES, TypedViews, copy_all


@dataclass
class Leaf:
    """One tensor or array to copy into the slot."""

    name: str
    obj: Any
    kind: str  # "t" torch, "a" numpy
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _torch() -> Any:
    return sys.modules.get("torch")


def _is_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


class HoldsDTensor(Exception):
    """The state holds a DTensor: it is saved through DCP's planner (dcp/route.py), not flattened."""


def _dtensor_class() -> Any:
    """DTensor's class, or None while its module is not imported (then no DTensor exists)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


class Flattener:
    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self._names: set[str] = set()
        self._dtensor = _dtensor_class()  # looked up once per walk, not per tensor

    def _leaf(self, path: str, obj: Any, kind: str, dtype: str, shape: tuple[int, ...]) -> dict[str, int]:
        itemsize = DTYPE_ITEMSIZE.get(dtype)
        if itemsize is None:
            raise TypeError(f"{path or '<root>'}: unsupported dtype {dtype}")
        name = path or "<root>"
        while name in self._names:
            name += "#"
        self._names.add(name)
        self.leaves.append(Leaf(name, obj, kind, dtype, shape, math.prod(shape) * itemsize))
        return {kind: len(self.leaves) - 1}

    def node(self, obj: Any, path: str = "", depth: int = 0) -> dict[str, Any]:
        if depth > 60:
            raise TypeError(f"{path}: state nested too deeply")
        if _is_tensor(obj):
            if self._dtensor is not None and isinstance(obj, self._dtensor):
                raise HoldsDTensor(path or "<root>")
            if obj.is_sparse or obj.is_quantized or getattr(obj, "is_nested", False):
                raise TypeError(f"{path or '<root>'}: sparse, quantized and nested tensors are not supported")
            dtype = str(obj.dtype).removeprefix("torch.")
            return self._leaf(path, obj, "t", dtype, tuple(obj.shape))
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise TypeError(f"{path or '<root>'}: numpy dtype {obj.dtype} is not supported")
            return self._leaf(path, obj, "a", obj.dtype.name, tuple(obj.shape))
        if obj is None or isinstance(obj, (bool, str)):
            return {"v": obj}
        if isinstance(obj, int):
            return {"v": int(obj)}
        if isinstance(obj, float):
            return {"f": float(obj).hex()}
        if isinstance(obj, np.generic) and not isinstance(obj, np.void):
            return self.node(obj.item(), path, depth)
        if isinstance(obj, dict):
            pairs = []
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"{_join(path, repr(k))}: dict keys must be str or int")
                pairs.append([k, self.node(v, _join(path, k), depth + 1)])
            return {"d": pairs}
        if isinstance(obj, list):
            return {"l": [self.node(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]}
        if isinstance(obj, tuple):
            return {"u": [self.node(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]}
        if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
            return {"s": self.node(obj.state_dict(), path, depth + 1)}
        raise TypeError(
            f"{path or '<root>'}: cannot checkpoint a value of type {type(obj).__name__} "
            "(use tensors, arrays, numbers, strings, containers or objects with state_dict())"
        )


def flatten(state: Any) -> tuple[list[Leaf], list[TensorEntry], str, int]:
    """Return (leaves, layout tensors, tree JSON, shard nbytes) for a state."""
    f = Flattener()
    tree = f.node(state)
    tensors: list[TensorEntry] = []
    offset = 0
    for leaf in f.leaves:
        offset = align_up(offset)
        tensors.append(TensorEntry(leaf.name, leaf.dtype, leaf.shape, offset, leaf.nbytes))
        offset += leaf.nbytes
    return f.leaves, tensors, json.dumps(tree, separators=(",", ":")), offset


def holds_dtensor(state: Any) -> bool:
    """Whether the state holds a DTensor anywhere (it then goes through DCP, dcp/route.py).

    Free while ``torch.distributed.tensor`` is not imported; otherwise a walk over the containers
    and ``state_dict()``s that ``Flattener`` would visit, without building its tree."""
    cls = _dtensor_class()
    if cls is None:
        return False
    stack: list[tuple[Any, int]] = [(state, 0)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, cls):
            return True
        if depth > 60 or _is_tensor(obj) or isinstance(obj, (np.ndarray, str, bytes, int, float)):
            continue
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend((v, depth + 1) for v in obj)
        elif callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
            stack.append((obj.state_dict(), depth + 1))
    return False


def copy_into(buf: Any, leaves: list[Leaf], tensors: list[TensorEntry], base: Any = None) -> None:
    """Copy every leaf straight into buf at its offset: one copy, no intermediate buffer.

    ``base`` is an optional uint8 torch tensor over the whole of buf (made once per mapping and
    reused): slicing it is much cheaper than a frombuffer per tensor.
    """
    torch = _torch()
    if torch is not None and base is None and any(leaf.kind == "t" for leaf in leaves):
        base = torch.frombuffer(buf, dtype=torch.uint8)
    grad_off = torch.no_grad() if torch is not None else None
    if grad_off is not None:
        grad_off.__enter__()
    try:
        _copy_leaves(buf, leaves, tensors, base)
    finally:
        if grad_off is not None:
            grad_off.__exit__(None, None, None)


def _copy_leaves(buf: Any, leaves: list[Leaf], tensors: list[TensorEntry], base: Any) -> None:
    for leaf, t in zip(leaves, tensors):
        if not t.nbytes:
            continue
        numel = t.nbytes // DTYPE_ITEMSIZE[t.dtype]
        if leaf.kind == "t":
            dst = base[t.offset : t.offset + t.nbytes].view(leaf.obj.dtype).view(leaf.shape)
            dst.copy_(leaf.obj.detach())
            del dst
        else:
            dst_a = np.frombuffer(buf, dtype=leaf.obj.dtype.newbyteorder("="), count=numel, offset=t.offset)
            np.copyto(dst_a.reshape(leaf.shape), leaf.obj, casting="equiv")  # one thread: see pcopy
            del dst_a


def view_of(buf: Any, kind: str, t: TensorEntry) -> Any:
    """A zero-copy tensor/array over buf for entry t.

    Built through a numpy array so the view holds a reference to the buffer export: the mapping
    cannot be closed under a live view (a stray view in a traceback cannot read unmapped memory).
    """
    numel = t.nbytes // DTYPE_ITEMSIZE[t.dtype]
    if kind == "t":
        torch = _torch()
        if torch is None:
            import torch  # noqa: F811 - the state held tensors when it was saved
        dtype = getattr(torch, t.dtype)
        if numel == 0:
            return torch.empty(t.shape, dtype=dtype)
        raw = np.frombuffer(buf, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return torch.from_numpy(raw).view(dtype).view(t.shape)
    if numel == 0:
        return np.empty(t.shape, dtype=t.dtype)
    return np.frombuffer(buf, dtype=t.dtype, count=numel, offset=t.offset).reshape(t.shape)


class Restorer:
    """Apply a saved tree onto a live state (see module docstring).

    With ``wait``, the buffer is still being filled: ``wait(n)`` returns once bytes [0, n) are
    there, and a large tensor restored in place is copied piece by piece behind the fill.
    """

    def __init__(self, buf: Any, tensors: list[TensorEntry], wait: Callable[[int], None] | None = None,
                 piece_bytes: int = 16 * 2**20, convert_dtype: bool = False) -> None:
        self.buf = buf
        self.convert_dtype = convert_dtype  # fill a tensor of another dtype (same shape) in place, cast
        self.tensors = tensors
        self.wait = wait
        self.piece_bytes = piece_bytes
        self._base: TypedViews | None = None  # over buf, through numpy (which holds the export)
        self._pending: list[tuple[Any, Any]] = []  # in-place torch copies, done in one batch

    def apply(self, node: dict[str, Any], cur: Any, path: str = "") -> Any:
        """Apply node onto cur; at the top level (path ""), every copy is done when it returns."""
        out = self._apply(node, cur, path)
        if not path:
            self._flush()
        return out

    def _flush(self) -> None:
        """Do the in-place copies queued so far, with one ``torch._foreach_copy_``."""
        if self._pending:
            torch = _torch()
            assert torch is not None
            dsts, srcs = zip(*self._pending)
            self._pending = []
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
            src = self._view(kind, t)
            if self.wait is not None:
                if t.nbytes > self.piece_bytes and self._in_pieces(t, cur, kind):
                    return cur
                self.wait(t.offset + t.nbytes)
            return self._tensor(src, cur, kind, path, t.nbytes < BATCH_MAX_BYTES)
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

    def _in_pieces(self, t: TensorEntry, cur: Any, kind: str) -> bool:
        """Copy t into ``cur`` (same shape and dtype, contiguous) piece by piece as the bytes
        arrive; False (nothing copied) when cur cannot take a flat byte copy."""
        shape = tuple(t.shape)
        if kind == "t":
            torch = _torch()
            if torch is None or not isinstance(cur, torch.Tensor) or tuple(cur.shape) != shape \
                    or str(cur.dtype).removeprefix("torch.") != t.dtype or not cur.is_contiguous() \
                    or cur.device.type != "cpu":
                return False
            dst = cur.detach().view(-1).view(torch.uint8)
            src = torch.from_numpy(np.frombuffer(self.buf, dtype=np.uint8, count=t.nbytes, offset=t.offset))
        else:
            if not isinstance(cur, np.ndarray) or cur.shape != shape or cur.dtype != np.dtype(t.dtype) \
                    or not cur.flags.c_contiguous or not cur.flags.writeable:
                return False
            dst = cur.reshape(-1).view(np.uint8)
            src = np.frombuffer(self.buf, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        assert self.wait is not None
        for a in range(0, t.nbytes, self.piece_bytes):
            b = min(a + self.piece_bytes, t.nbytes)
            self.wait(t.offset + b)
            if kind == "t":
                dst[a:b].copy_(src[a:b])
            else:
                pcopy.copyto(dst[a:b], src[a:b])
        return True

    def _tensor(self, src: Any, cur: Any, kind: str, path: str, batch: bool = False) -> Any:
        if kind == "t":
            torch = _torch()
            assert torch is not None
            if (isinstance(cur, torch.Tensor) and cur.shape == src.shape
                    and (cur.dtype == src.dtype or self.convert_dtype)):
                if batch and cur.dtype == src.dtype:
                    self._pending.append((cur, src))  # copied by _flush, before apply returns
                else:
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
