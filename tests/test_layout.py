"""Shard layouts and trees: pure code, no daemon.

Layout validation enforces every invariant in ckptd/core/layout.py (no overlap, in bounds, nbytes
matching dtype and shape, unique names, known dtypes, dimension and name limits, well-formed trees
within the depth and size limits, every tensor referenced exactly once); the client's flattener
always produces layouts the daemon accepts, with aligned offsets, and they restore to exactly the
state that was flattened.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from ckptd_client.restore.walk import Restorer
from ckptd_client.tree import copy_into, flatten
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import (
    MAX_TREE_DEPTH,
    TensorEntry,
    align_up,
    parse_tree,
    validate_tensors,
)
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import DTYPE_ITEMSIZE, MAX_NDIM, MAX_TENSOR_NAME_LEN
from tests._manifest_kit import CHUNK

# -- layout validation ------------------------------------------------------------------------


def T(name: str, dtype: str, shape: tuple[int, ...], offset: int) -> TensorEntry:
    return TensorEntry(name, dtype, shape, offset, math.prod(shape) * DTYPE_ITEMSIZE[dtype])


def test_valid_layouts() -> None:
    validate_tensors([], 0)
    validate_tensors([T("a", "float32", (4,), 0), T("b", "bfloat16", (2, 3), 16)], 28)  # adjacent
    validate_tensors([T("e", "float32", (0, 5), 8), T("f", "int8", (), 8), T("g", "uint8", (0,), 9)], 9)
    validate_tensors([T("s", "complex128", (), 0)], 16)  # 0-d
    validate_tensors([T(f"t{i}", d, (3,), 64 * i) for i, d in enumerate(DTYPE_ITEMSIZE)], 64 * len(DTYPE_ITEMSIZE))


@pytest.mark.parametrize("tensors,nbytes,pattern", [
    ([T("a", "float32", (4,), 0), T("b", "float32", (4,), 8)], 64, "overlap"),
    ([T("a", "float32", (4,), 8), T("b", "float32", (4,), 0)], 64, "overlap"),  # order does not matter
    ([T("a", "float32", (4,), 0), T("b", "uint8", (1,), 15)], 64, "overlap"),
    ([T("a", "float32", (4,), 60)], 64, "outside"),
    ([T("a", "float32", (4,), -4)], 64, "outside"),
    ([T("a", "float32", (4,), 2**64)], 64, "outside"),
    ([TensorEntry("a", "float32", (4,), 0, 15)], 64, "nbytes"),
    ([TensorEntry("a", "float32", (4,), 0, 0)], 64, "nbytes"),
    ([TensorEntry("a", "float32", (2**31, 2**31), 0, 16)], 64, "nbytes"),
    ([T("a", "uint8", (1,), 0), T("a", "uint8", (1,), 1)], 64, "duplicate"),
    ([TensorEntry("a", "float128", (1,), 0, 16)], 64, "dtype"),
    ([TensorEntry("a", "torch.float32", (1,), 0, 4)], 64, "dtype"),
    ([TensorEntry("a", "float32", (-1,), 0, -4)], 64, "negative"),
    ([TensorEntry("a", "float32", (1,) * (MAX_NDIM + 1), 0, 4)], 64, "dims"),
    ([T("", "uint8", (1,), 0)], 64, "name"),
    ([T("n" * (MAX_TENSOR_NAME_LEN + 1), "uint8", (1,), 0)], 64, "name"),
])
def test_invalid_layouts(tensors: list[TensorEntry], nbytes: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        validate_tensors(tensors, nbytes)


def _nest(depth: int, leaf: str = '{"v":1}') -> str:
    return '{"l":[' * depth + leaf + "]}" * depth


@pytest.mark.parametrize("tree,n,pattern", [
    ("not json", 0, "not valid JSON"),
    ("[" * 50_000, 0, "not valid JSON"),
    ("[]", 0, "exactly one key"),
    ("{}", 0, "exactly one key"),
    ('{"v":1,"f":"0x1p+0"}', 0, "exactly one key"),
    ('{"q":1}', 0, "unknown tree node kind"),
    ('{"t":0}', 0, "out of range"),
    ('{"t":-1}', 1, "out of range"),
    ('{"t":true}', 1, "out of range"),
    ('{"t":"0"}', 1, "out of range"),
    ('{"a":1.0}', 2, "out of range"),
    ('{"l":[{"t":0},{"a":0}]}', 1, "twice"),
    ('{"d":[["x",{"t":0}],["y",{"t":0}]]}', 1, "twice"),
    ('{"l":[{"t":0}]}', 2, "references 1 of 2"),
    ('{"d":[]}', 1, "references 0 of 1"),
    ('{"d":{"x":{"v":1}}}', 0, "list of"),
    ('{"d":[["x"]]}', 0, "pairs"),
    ('{"d":[["x",{"v":1},3]]}', 0, "pairs"),
    ('{"d":[[true,{"v":1}]]}', 0, "keys"),
    ('{"d":[[1.5,{"v":1}]]}', 0, "keys"),
    ('{"d":[[null,{"v":1}]]}', 0, "keys"),
    ('{"d":[[["k"],{"v":1}]]}', 0, "keys"),
    ('{"l":{"v":1}}', 0, "list"),
    ('{"u":"abc"}', 0, "list"),
    ('{"v":1.5}', 0, "value node"),
    ('{"v":[1]}', 0, "value node"),
    ('{"v":{"a":1}}', 0, "value node"),
    ('{"f":1.5}', 0, "float"),
    ('{"f":"0xzz"}', 0, "float"),
    ('{"s":[]}', 0, "exactly one key"),
    (_nest(MAX_TREE_DEPTH + 1), 0, "deeper"),
    ('{"s":' * (MAX_TREE_DEPTH + 1) + '{"v":1}' + "}" * (MAX_TREE_DEPTH + 1), 0, "deeper"),
])
def test_invalid_trees(tree: str, n: int, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_tree(tree, n)


def test_valid_trees() -> None:
    assert parse_tree(_nest(MAX_TREE_DEPTH), 0) is not None
    tree = {"s": {"d": [["w", {"t": 0}], [1, {"a": 1}], [-2, {"u": [{"v": None}, {"v": True}, {"v": "é"}]}],
                        ["nan", {"f": "nan"}], ["inf", {"f": "-inf"}], ["big", {"v": 2**80}]]}}
    assert parse_tree(json.dumps(tree), 2) == tree


def test_tree_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptd.core.layout as layout

    monkeypatch.setattr(layout, "MAX_TREE_JSON_BYTES", 64)
    with pytest.raises(ValueError, match="larger than"):
        parse_tree('{"l":[' + ",".join(['{"v":1}'] * 20) + "]}", 0)


# -- layouts the client builds are layouts the daemon accepts (and restore them) ----------------

np_dtypes = st.sampled_from(["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64",
                             "uint32", "uint16", "uint8", "bool", "complex64", "complex128"])
shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=3).map(tuple)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(np_dtypes))
    shape = draw(shapes)
    n = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    if dtype == np.bool_:
        raw = bytes(b & 1 for b in raw)
    a = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    if a.ndim == 2 and draw(st.booleans()):
        a = a.T  # non-contiguous
    return a


plain = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
         | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
keys = st.text(max_size=6) | st.integers(min_value=-1000, max_value=1000)
states = st.recursive(
    plain | arrays(),
    lambda children: (st.lists(children, max_size=4) | st.lists(children, max_size=3).map(tuple)
                      | st.dictionaries(keys, children, max_size=4)),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    """Exact equality: arrays by dtype, shape and bytes; floats by bits; types kept."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states)
def test_flattened_layouts_validate_and_round_trip(state: Any) -> None:
    leaves, tensors, tree_json, nbytes = flatten(state)
    validate_tensors(tensors, nbytes)  # what the daemon checks at CommitShard
    tree = parse_tree(tree_json, len(tensors))
    for t in tensors:
        assert t.offset == align_up(t.offset)
    buf = bytearray(nbytes)
    copy_into(buf, leaves, tensors)
    entry = ShardEntry(0, nbytes, CHUNK, tuple(chunk_crcs(buf, CHUNK)), tuple(tensors), tree)
    m = Manifest("prop-job", 7, 1, (entry,))
    back = Manifest.from_json(m.to_json())
    assert back == m
    restored = Restorer(buf, list(back.shard(0).tensors)).apply(back.shard(0).tree, None)
    assert same(state, restored)
