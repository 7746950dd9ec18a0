"""A memo of shard layouts: convert, parse and validate a layout once per distinct tensor list.

A training job saves a state of the same shape every step, so its layout (tens of thousands of
``TensorMeta`` entries for a real model) is the same bytes every time. Converting it between
``TensorEntry`` and protobuf costs microseconds per tensor in Python; this memo does that work
once per distinct layout and hands back the very same objects afterwards:

- ``decode(layout)``: the tensors of a ``ShardLayout`` message as a tuple, keyed by the
  serialized bytes of its tensor list (serializing is C code, ~0.1 us per tensor); equal layouts
  decode to the same tuple object, so identity checks work downstream;
- ``decode_with_tree(layout)``: ``decode`` plus the parsed ``tree_json``, keyed by the whole
  layout's serialized bytes (a restore's client: one serialization instead of a tensor-list copy,
  and the tree's JSON parsed once); the tree is shared between hits, so its users only read it;
- ``encode(tensors, tree_json)``: the message for a tensor tuple, keyed by the tuple's identity;
- ``tree_json(tree)``: ``json.dumps`` of a parsed tree (a committed shard's), keyed by identity;
- ``check(tensors, nbytes, tree_json)``: ``validate_tensors`` and ``parse_tree`` (which raise
  ValueError), skipped for a tensor tuple already validated against the same shard size and a
  tree_json already parsed (its result is kept).

Invariants: a hit returns exactly what a miss would compute for equal input (the keys are the
whole input: the serialized tensor list, the identical tuple object, the tree text); entries
are bounded (``max_entries`` per kind, least recently used out); the memo holds references to
the tuples it keys by identity, so an id is never reused while it is cached. Not thread-safe:
one owner (the daemon's event loop, or one client) uses it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.layout import TensorEntry, parse_tree, tensors_from_pb, validate_tensors

DEFAULT_MAX_ENTRIES: Final = 8


def _put(cache: OrderedDict[Any, Any], key: Any, value: Any, max_entries: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > max_entries:
        cache.popitem(last=False)


def tensors_bytes(layout: pb.ShardLayout) -> bytes:
    """The serialized tensor list of a layout (its tree left out): the memo's key."""
    only = pb.ShardLayout()
    only.tensors.MergeFrom(layout.tensors)
    return only.SerializeToString(deterministic=True)


class LayoutMemo:
    """Layouts converted, parsed and validated once per distinct input (module docstring)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._decoded: OrderedDict[bytes, tuple[TensorEntry, ...]] = OrderedDict()
        # id(tuple) -> (the tuple itself, so its id stays taken; its serialized tensor list)
        self._encoded: OrderedDict[int, tuple[tuple[TensorEntry, ...], bytes]] = OrderedDict()
        self._valid: OrderedDict[tuple[int, int], tuple[TensorEntry, ...]] = OrderedDict()
        self._trees: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._whole: OrderedDict[bytes, tuple[tuple[TensorEntry, ...], Any]] = OrderedDict()
        self._dumped: OrderedDict[int, tuple[Any, str]] = OrderedDict()  # id(tree) -> (tree, its JSON)
        self.hits = 0
        self.misses = 0

    def decode(self, layout: pb.ShardLayout) -> tuple[TensorEntry, ...]:
        """``tensors_from_pb`` of layout (InvalidArgument for a bad entry), memoized."""
        key = tensors_bytes(layout)
        got = self._decoded.get(key)
        if got is not None:
            self.hits += 1
            self._decoded.move_to_end(key)
            return got
        self.misses += 1
        tensors = tuple(tensors_from_pb(layout))
        _put(self._decoded, key, tensors, self.max_entries)
        _put(self._encoded, id(tensors), (tensors, key), self.max_entries)
        return tensors

    def decode_with_tree(self, layout: pb.ShardLayout) -> tuple[tuple[TensorEntry, ...], Any]:
        """(``decode(layout)``, ``json.loads(layout.tree_json)``), memoized; the tree is shared
        between calls with equal layouts: read it, never change it."""
        key = layout.SerializeToString(deterministic=True)
        got = self._whole.get(key)
        if got is not None:
            self.hits += 1
            self._whole.move_to_end(key)
            return got
        out = (self.decode(layout), json.loads(layout.tree_json))
        _put(self._whole, key, out, self.max_entries)
        return out

    def tree_json(self, tree: Any) -> str:
        """``json.dumps(tree)``, once per tree object (the daemon's trees are never changed)."""
        got = self._dumped.get(id(tree))
        if got is not None and got[0] is tree:
            return got[1]
        text = json.dumps(tree)
        _put(self._dumped, id(tree), (tree, text), self.max_entries)
        return text

    def encode(self, tensors: Sequence[TensorEntry], tree_json: str) -> pb.ShardLayout:
        """The ``ShardLayout`` of tensors and tree_json; the tensor list is built once per tuple."""
        got = self._encoded.get(id(tensors))
        if got is not None and got[0] is tensors:
            self.hits += 1
            raw = got[1]
        else:
            self.misses += 1
            raw = pb.ShardLayout(tensors=[
                pb.TensorMeta(name=t.name, dtype=t.dtype, shape=list(t.shape), offset=t.offset, nbytes=t.nbytes)
                for t in tensors]).SerializeToString(deterministic=True)
            if isinstance(tensors, tuple):
                _put(self._encoded, id(tensors), (tensors, raw), self.max_entries)
                _put(self._decoded, raw, tensors, self.max_entries)  # what decode would build
        msg = pb.ShardLayout.FromString(raw)
        msg.tree_json = tree_json
        return msg

    def check(self, tensors: tuple[TensorEntry, ...], nbytes: int, tree_json: str) -> Any:
        """Validate the tensors against a shard of nbytes and parse the tree (ValueError if
        either is bad); return the parsed tree. Work already done for equal input is skipped."""
        key = (id(tensors), nbytes)
        if self._valid.get(key) is not tensors:
            validate_tensors(list(tensors), nbytes)
            _put(self._valid, key, tensors, self.max_entries)
        tkey = (tree_json, len(tensors))
        tree = self._trees.get(tkey)
        if tree is None:
            tree = parse_tree(tree_json, len(tensors))
            _put(self._trees, tkey, tree, self.max_entries)
        return tree


__all__ = ["LayoutMemo", "tensors_bytes"]
