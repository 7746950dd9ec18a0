"""Flatten a training state into tensors + a typed JSON tree, and restore it in place.

Accepted: nested dicts (str/int keys), lists, tuples; torch tensors (every dtype in
``ckptd.core.types.DTYPE_ITEMSIZE``, non-contiguous, 0-d, empty, any device); numpy arrays;
int/float/str/bool/None; and any object with ``state_dict()``/``load_state_dict()`` (model,
optimizer, LR scheduler). Anything else raises TypeError naming its key. Nothing is pickled.

The restore walk (the way back) is ``restore/walk.py``'s ``Restorer``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptd.core.layout import TensorEntry, align_up
from ckptd.core.types import DTYPE_ITEMSIZE


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
