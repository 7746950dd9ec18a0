"""The save path's per-tensor work, done once per state shape instead of once per save.

A trainer saves a state of the same structure every step. ``SavePlanner.plan(state)`` walks it
(``tree.Flattener``: the walk itself cannot be skipped, a value may have changed) and compares
the leaves' (name, dtype, shape) with the previous save's, one list comparison in C; when equal
it reuses the previous layout: the same ``TensorEntry`` tuple (so the ``LayoutMemo`` hands back
its serialized message without building 10^4..10^5 protobuf entries again) and the same offsets.
``copy(plan, slot_path, mm, base)`` copies the small tensors into the slot with one
``torch._foreach_copy_`` over destination views made once per (slot, layout) and kept, instead
of slicing the slot and calling ``copy_`` per tensor; large ones (``BATCH_MAX_BYTES``) get one
``copy_`` each over the same kept views (it splits a copy over torch's intra-op threads, the
batch kernel does not); numpy leaves are copied one by one.

Invariants: a plan's layout is exactly what ``tree.flatten`` would build for the state (same
names, dtypes, shapes, offsets, tree); cached views are only used for the slot mapping and
layout they were made for (the base tensor's identity and the tensor tuple's identity are both
checked), and are dropped with ``forget(slot_path)`` before that mapping is closed; every byte
of every leaf is copied on every save (nothing is skipped because it "did not change").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.layout import TensorEntry, align_up
from ckptd.core.layout_memo import LayoutMemo
from ckptd.core.types import DTYPE_ITEMSIZE
from ckptd_client.tree import Flattener, Leaf, _torch
from ckptd_client.views import BATCH_MAX_BYTES, TypedViews, copy_all

Signature = list[tuple[str, str, tuple[int, ...]]]


@dataclass
class SavePlan:
    """One save's leaves and the layout they go to."""

    leaves: list[Leaf]
    tensors: tuple[TensorEntry, ...]
    tree_json: str
    nbytes: int
    reused: bool  # the layout of the previous save was reused


def _layout(leaves: list[Leaf]) -> tuple[tuple[TensorEntry, ...], int]:
    tensors: list[TensorEntry] = []
    offset = 0
    for leaf in leaves:
        offset = align_up(offset)
        tensors.append(TensorEntry(leaf.name, leaf.dtype, leaf.shape, offset, leaf.nbytes))
        offset += leaf.nbytes
    return tuple(tensors), offset


class SavePlanner:
    """Layouts and copy plans of one manager's saves, reused while the state's shape holds."""

    def __init__(self, layouts: LayoutMemo | None = None) -> None:
        self.layouts = layouts if layouts is not None else LayoutMemo()
        self._sig: Signature | None = None
        self._tensors: tuple[TensorEntry, ...] = ()
        self._nbytes = 0
        # indices of the torch leaves copied in one batch (small) and one by one (large)
        self._small: list[int] = []
        self._large: list[int] = []
        # slot path -> (base tensor, tensor tuple, views of the small leaves, of the large ones)
        self._views: dict[str, tuple[Any, tuple[TensorEntry, ...], list[Any], list[Any]]] = {}

    def plan(self, state: Any) -> SavePlan:
        """Flatten state (TypeError for unsupported values) and lay it out, reusing the last
        layout when the leaves' names, dtypes and shapes are the same."""
        f = Flattener()
        tree_json = json.dumps(f.node(state), separators=(",", ":"))
        leaves = f.leaves
        sig = [(leaf.name, leaf.dtype, leaf.shape) for leaf in leaves]
        reused = sig == self._sig
        if not reused:
            self._tensors, self._nbytes = _layout(leaves)
            torch_leaves = [i for i, leaf in enumerate(leaves) if leaf.kind == "t" and leaf.nbytes]
            self._small = [i for i in torch_leaves if leaves[i].nbytes < BATCH_MAX_BYTES]
            self._large = [i for i in torch_leaves if leaves[i].nbytes >= BATCH_MAX_BYTES]
            self._sig = sig
        return SavePlan(leaves, self._tensors, tree_json, self._nbytes, reused)

    def layout_pb(self, plan: SavePlan) -> pb.ShardLayout:
        return self.layouts.encode(plan.tensors, plan.tree_json)

    def _make_views(self, torch: Any, base: Any, tensors: tuple[TensorEntry, ...]) -> tuple[list[Any], list[Any]]:
        views = TypedViews(torch, base)
        return [views.view(tensors[i]) for i in self._small], [views.view(tensors[i]) for i in self._large]

    def copy(self, plan: SavePlan, slot_path: str, mm: Any, base: Any) -> None:
        """Copy every leaf of plan into the slot mapping mm (``base``: a uint8 tensor over it)."""
        torch = _torch()
        if torch is None or base is None or plan.tensors is not self._tensors:
            from ckptd_client.tree import copy_into

            copy_into(mm, plan.leaves, list(plan.tensors), base)
            return
        cached = self._views.get(slot_path)
        if cached is not None and cached[0] is base and cached[1] is plan.tensors:
            small, large = cached[2], cached[3]
        else:
            small, large = self._make_views(torch, base, plan.tensors)
            self._views[slot_path] = (base, plan.tensors, small, large)
        leaves = plan.leaves
        with torch.no_grad():
            if small:
                copy_all(torch, small, [leaves[i].obj for i in self._small])
            for dst, i in zip(large, self._large):
                dst.copy_(leaves[i].obj)  # one tensor over torch's intra-op threads
        for leaf, t in zip(leaves, plan.tensors):
            if leaf.kind == "a" and t.nbytes:
                numel = t.nbytes // DTYPE_ITEMSIZE[t.dtype]
                dst_a = np.frombuffer(mm, dtype=leaf.obj.dtype.newbyteorder("="), count=numel, offset=t.offset)
                np.copyto(dst_a.reshape(leaf.shape), leaf.obj, casting="equiv")
                del dst_a

    def warm(self, slot_path: str, base: Any) -> None:
        """Make the views of the last layout over a slot mapped ahead of need (slot_warmer.py),
        so the first save into it copies at steady speed. Safe beside a save: an entry is used
        only for the very base and tensor tuple it was made for."""
        torch, tensors = _torch(), self._tensors
        if torch is None or base is None or not tensors or slot_path in self._views:
            return
        small, large = self._make_views(torch, base, tensors)
        if tensors is self._tensors:  # the layout did not change meanwhile
            self._views.setdefault(slot_path, (base, tensors, small, large))

    def forget(self, slot_path: str | None = None) -> None:
        """Drop the cached views of one slot (all with None), before its mapping is closed."""
        if slot_path is None:
            self._views.clear()
        else:
            self._views.pop(slot_path, None)


__all__ = ["SavePlan", "SavePlanner"]
