"""Strict restore: compare a saved tree with the caller's state before a byte is copied.

``CheckpointManager.restore`` is strict by default. Against the caller's state, the saved tree
(``tree.py``'s typed JSON) must have:
- every key the caller asked for (a dict key, a list or tuple position): a missing one is named;
- no key the caller did not pass: an extra one is named and nothing is added;
- for each tensor or array, the caller's shape and dtype: a mismatch names the key, unless the
  caller opted into dtype conversion (``convert_dtype=True``: a tensor of another dtype but the
  same shape is filled in place with ``copy_``'s cast, an array with numpy's ``same_kind`` cast);
  a shape never converts.

A caller's ``None``, empty dict or empty list is a placeholder the checkpoint fills whole
(``restore({})`` reads everything a step holds; a fresh optimizer's empty ``state``). Inside an
object with ``state_dict()``/``load_state_dict()`` (a model, an optimizer) the object's own
``load_state_dict`` judges its keys: an optimizer built afresh has no state yet and gets the saved
one; a shape or dtype mismatch is still named here. Plain values (numbers, strings) are always
taken from the checkpoint: they cannot be filled in place.

``strict=False`` is the old lenient restore, explicitly: missing keys are left alone, extra keys
are added, a tensor of another shape or dtype is replaced by a new CPU tensor.

Invariant: under strict restore a mismatch raises ``StateMismatchError`` before anything is copied,
so the caller's state is left as it was.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptd.core.layout import TensorEntry


@dataclass(frozen=True)
class Strictness:
    """How a restore treats differences between the saved tree and the caller's state."""

    strict: bool = True
    convert_dtype: bool = False


class StateMismatchError(ValueError):
    """The checkpoint does not match the caller's state (strict restore); nothing was copied."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_names(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the state passed: {_names(unexpected)}")
        if mismatched:
            parts.append(f"shape/dtype differ: {_names(mismatched)}")
        super().__init__("strict restore: " + "; ".join(parts)
                         + " (nothing was restored; restore(..., strict=False) is the lenient restore)")


    def __reduce__(self) -> tuple[type[StateMismatchError], tuple[list[str], list[str], list[str]]]:
        return StateMismatchError, (self.missing, self.unexpected, self.mismatched)  # crosses DCP's gathers


def _names(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


@dataclass
class _Check:
    tensors: list[TensorEntry]
    convert_dtype: bool
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def node(self, node: dict[str, Any], cur: Any, path: str, owned: bool) -> None:
        """``owned``: inside a stateful object, whose load_state_dict judges its keys."""
        ((kind, val),) = node.items()
        if cur is None or (isinstance(cur, (dict, list)) and not cur):
            return  # a placeholder (None, an empty dict or list): the saved value fills it
        name = path or "<root>"
        if kind in ("t", "a"):
            self.leaf(kind, self.tensors[val], cur, name)
        elif kind == "d":
            if not isinstance(cur, dict):
                self.mismatched.append(f"{name} (saved a dict, state has {type(cur).__name__})")
                return
            saved = {k for k, _ in val}
            if not owned:
                self.missing.extend(_join(path, k) for k in cur if k not in saved)
            for k, child in val:
                if k in cur:
                    self.node(child, cur[k], _join(path, k), owned)
                elif not owned:
                    self.unexpected.append(_join(path, k))
        elif kind in ("l", "u"):
            want = list if kind == "l" else tuple
            if not isinstance(cur, want):
                self.mismatched.append(f"{name} (saved a {want.__name__}, state has {type(cur).__name__})")
            elif len(cur) != len(val) and not owned:
                self.mismatched.append(f"{name} (saved {len(val)} items, state has {len(cur)})")
            elif len(cur) == len(val):
                for i, (child, item) in enumerate(zip(val, cur)):
                    self.node(child, item, _join(path, i), owned)
        elif kind == "s":
            if callable(getattr(cur, "state_dict", None)) and callable(getattr(cur, "load_state_dict", None)):
                self.node(val, cur.state_dict(), path, True)
            else:
                self.node(val, cur, path, owned)

    def leaf(self, kind: str, t: TensorEntry, cur: Any, name: str) -> None:
        torch = sys.modules.get("torch")
        if kind == "t":
            if torch is None or not isinstance(cur, torch.Tensor):
                self.mismatched.append(f"{name} (saved a tensor, state has {type(cur).__name__})")
                return
            have_dtype, have_shape = str(cur.dtype).removeprefix("torch."), tuple(cur.shape)
        else:
            if not isinstance(cur, np.ndarray):
                self.mismatched.append(f"{name} (saved an array, state has {type(cur).__name__})")
                return
            have_dtype, have_shape = cur.dtype.name, tuple(cur.shape)
        shape_ok = have_shape == tuple(t.shape)
        dtype_ok = have_dtype == t.dtype or (self.convert_dtype and shape_ok)
        if not (shape_ok and dtype_ok):
            self.mismatched.append(f"{name} (saved {t.dtype}{list(t.shape)}, state has {have_dtype}{list(have_shape)})")


def check_state(tree: dict[str, Any], tensors: list[TensorEntry], state: Any, strictness: Strictness) -> None:
    """Raise StateMismatchError naming every difference strict restore refuses; no-op when lenient."""
    if not strictness.strict:
        return
    check = _Check(tensors, strictness.convert_dtype)
    check.node(tree, state, "", False)
    if check.missing or check.unexpected or check.mismatched:
        raise StateMismatchError(check.missing, check.unexpected, check.mismatched)
