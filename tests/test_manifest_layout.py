"""Manifests, shard layouts and retention: pure code, no daemon.

Canonical JSON is byte-stable, manifests round-trip, and ``from_json`` treats a manifest as hostile
input (anything malformed is a ValueError saying what is wrong, never another exception). Layout
validation enforces every invariant in ckptd/layout.py; the client's flattener always produces
layouts the daemon accepts. Retention never selects the newest step and keeps what it must.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from ckptd_client.tree import Restorer, copy_into, flatten
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.integrity import chunk_crcs
from ckptd.layout import (
    MAX_TREE_DEPTH,
    TensorEntry,
    align_up,
    chunk_count,
    parse_tree,
    validate_tensors,
)
from ckptd.manifest import SCHEMA_VERSION, Manifest, ShardEntry, canonical_json
from ckptd.retention import select_for_deletion
from ckptd.types import DTYPE_ITEMSIZE, MAX_NDIM, MAX_STEP, MAX_TENSOR_NAME_LEN

CHUNK = 4096


def shard(rank: int, nbytes: int = 100, chunk_bytes: int = CHUNK) -> ShardEntry:
    data = bytes((rank * 7 + i) % 251 for i in range(nbytes))
    tensors: tuple[TensorEntry, ...] = ()
    tree: Any = {"d": []}
    if nbytes >= 16:
        tensors = (TensorEntry("w", "float32", (2, 2), 0, 16),)
        tree = {"d": [["w", {"t": 0}], ["lr", {"f": (0.1).hex()}], [3, {"v": "x"}]]}
    return ShardEntry(rank, nbytes, chunk_bytes, tuple(chunk_crcs(data, chunk_bytes)), tensors, tree)


def manifest(world_size: int = 2, job: str = "job-a", step: int = 12) -> Manifest:
    return Manifest(job, step, world_size, tuple(shard(r, 100 + 5000 * r) for r in range(world_size)),
                    created_unix_s=1700000000.25, extra={"note": "ünïcode", "n": [1, 2]})


def good_obj() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(manifest().to_json())
    return obj


# -- canonical JSON ---------------------------------------------------------------------------


def test_canonical_json_is_byte_stable() -> None:
    a = {"b": 1, "a": [1, 2, {"z": None, "y": "é"}], "c": 1.5}
    b = {"c": 1.5, "a": [1, 2, {"y": "é", "z": None}], "b": 1}
    assert canonical_json(a) == canonical_json(b) == b'{"a":[1,2,{"y":"\\u00e9","z":null}],"b":1,"c":1.5}'
    canonical_json(a).decode("ascii")  # pure ASCII


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_canonical_json_refuses_non_finite(bad: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": bad})


def test_manifest_bytes_do_not_depend_on_shard_order() -> None:
    m = manifest(world_size=3)
    shuffled = Manifest(m.job, m.step, m.world_size, tuple(reversed(m.shards)), m.created_unix_s, m.extra)
    assert shuffled.to_json() == m.to_json()
    assert m.to_json() == manifest(world_size=3).to_json()  # deterministic across builds
    obj = json.loads(m.to_json())
    assert obj["schema_version"] == SCHEMA_VERSION
    assert [s["rank"] for s in obj["shards"]] == [0, 1, 2]
    assert obj["nbytes"] == m.nbytes == sum(s.nbytes for s in m.shards)
    assert [s["key"] for s in obj["shards"]] == ["rank-000000.shard", "rank-000001.shard", "rank-000002.shard"]


def test_manifest_round_trip() -> None:
    m = manifest(world_size=4)
    data = m.to_json()
    back = Manifest.from_json(data)
    assert back == m
    assert back.to_json() == data
    assert Manifest.from_json(data.decode()) == m  # str input too
    assert back.shard(3).chunk_crc32c == m.shard(3).chunk_crc32c
    with pytest.raises(KeyError):
        back.shard(4)


def test_empty_shards_round_trip() -> None:
    m = Manifest("j", 0, 2, (shard(0, 0), shard(1, 0)))
    assert Manifest.from_json(m.to_json()) == m
    assert m.nbytes == 0


# -- hostile manifests ------------------------------------------------------------------------


def _mutations() -> list[tuple[str, Any]]:
    """(id, function mutating a valid manifest object into an invalid one)."""

    def set_(path: tuple[Any, ...], value: Any) -> Any:
        def f(obj: dict[str, Any]) -> None:
            cur: Any = obj
            for p in path[:-1]:
                cur = cur[p]
            cur[path[-1]] = value
        return f

    def delete(path: tuple[Any, ...]) -> Any:
        def f(obj: dict[str, Any]) -> None:
            cur: Any = obj
            for p in path[:-1]:
                cur = cur[p]
            del cur[path[-1]]
        return f

    def add_tensor(entry: dict[str, Any], ref: bool = True) -> Any:
        def f(obj: dict[str, Any]) -> None:
            s = obj["shards"][1]
            s["tensors"].append(entry)
            if ref:
                s["tree"]["d"].append(["extra", {"t": len(s["tensors"]) - 1}])
        return f

    def drop_rank(obj: dict[str, Any]) -> None:
        obj["shards"].pop()

    def dup_rank(obj: dict[str, Any]) -> None:
        obj["shards"][1] = copy.deepcopy(obj["shards"][0])

    return [
        ("schema-2", set_(("schema_version",), 2)),
        ("schema-str", set_(("schema_version",), "1")),
        ("schema-missing", delete(("schema_version",))),
        ("job-dotdot", set_(("job",), "../etc")),
        ("job-dotdot-inner", set_(("job",), "a..b")),
        ("job-slash", set_(("job",), "a/b")),
        ("job-abs", set_(("job",), "/abs")),
        ("job-empty", set_(("job",), "")),
        ("job-int", set_(("job",), 5)),
        ("job-long", set_(("job",), "j" * 129)),
        ("step-negative", set_(("step",), -1)),
        ("step-huge", set_(("step",), MAX_STEP + 1)),
        ("step-float", set_(("step",), 3.0)),
        ("step-bool", set_(("step",), True)),
        ("step-str", set_(("step",), "12")),
        ("step-missing", delete(("step",))),
        ("world-size-str", set_(("world_size",), "2")),
        ("world-size-huge", set_(("world_size",), 10**30)),
        ("world-size-2**40", set_(("world_size",), 2**40)),  # must not build a list of 2**40 ranks
        ("world-size-zero", set_(("world_size",), 0)),
        ("missing-rank", drop_rank),
        ("duplicate-rank", dup_rank),
        ("rank-out-of-range", set_(("shards", 1, "rank"), 2)),
        ("rank-negative", set_(("shards", 1, "rank"), -1)),
        ("shards-not-list", set_(("shards",), {"0": {}})),
        ("shards-missing", delete(("shards",))),
        ("shard-not-object", set_(("shards", 0), [1, 2])),
        ("crc-short", set_(("shards", 1, "chunk_crc32c"), [])),
        ("crc-long", lambda o: o["shards"][0]["chunk_crc32c"].append(1)),
        ("crc-too-big", set_(("shards", 0, "chunk_crc32c", 0), 2**32)),
        ("crc-negative", set_(("shards", 0, "chunk_crc32c", 0), -1)),
        ("crc-str", set_(("shards", 0, "chunk_crc32c", 0), "abc")),
        ("crc-null", set_(("shards", 0, "chunk_crc32c"), None)),
        ("nbytes-huge", set_(("shards", 1, "nbytes"), 10**30)),
        ("nbytes-negative", set_(("shards", 1, "nbytes"), -100)),
        ("nbytes-float", set_(("shards", 1, "nbytes"), 5100.0)),
        ("chunk-bytes-zero", set_(("shards", 1, "chunk_bytes"), 0)),
        ("key-traversal", set_(("shards", 1, "key"), "../../etc/passwd")),
        ("key-other-rank", set_(("shards", 1, "key"), "rank-000000.shard")),
        ("tensor-bad-dtype", set_(("shards", 0, "tensors", 0, "dtype"), "float128")),
        ("tensor-overlap", add_tensor({"name": "o", "dtype": "float32", "shape": [2], "offset": 8, "nbytes": 8})),
        ("tensor-out-of-bounds", add_tensor({"name": "o", "dtype": "uint8", "shape": [10], "offset": 5096,
                                             "nbytes": 10})),
        ("tensor-offset-huge", add_tensor({"name": "o", "dtype": "uint8", "shape": [1], "offset": 2**70,
                                           "nbytes": 1})),
        ("tensor-nbytes-mismatch", set_(("shards", 0, "tensors", 0, "nbytes"), 12)),
        ("tensor-shape-huge", set_(("shards", 0, "tensors", 0, "shape"), [2**40, 2**40])),
        ("tensor-shape-negative", set_(("shards", 0, "tensors", 0, "shape"), [-2, -2])),
        ("tensor-shape-str", set_(("shards", 0, "tensors", 0, "shape"), "22")),
        ("tensor-too-many-dims", set_(("shards", 0, "tensors", 0, "shape"), [1] * (MAX_NDIM + 1))),
        ("tensor-missing-name", delete(("shards", 0, "tensors", 0, "name"))),
        ("tensor-not-object", set_(("shards", 0, "tensors", 0), "w")),
        ("tensor-duplicate-name", add_tensor({"name": "w", "dtype": "uint8", "shape": [1], "offset": 50,
                                              "nbytes": 1})),
        ("tensor-unreferenced", add_tensor({"name": "o", "dtype": "uint8", "shape": [1], "offset": 50,
                                            "nbytes": 1}, ref=False)),
        ("tree-bad-node", set_(("shards", 0, "tree"), {"x": 1})),
        ("tree-two-keys", set_(("shards", 0, "tree"), {"d": [], "l": []})),
        ("tree-missing", delete(("shards", 0, "tree"))),
        ("tree-tensor-twice", set_(("shards", 0, "tree"), {"l": [{"t": 0}, {"t": 0}]})),
        ("tree-tensor-out-of-range", set_(("shards", 0, "tree"), {"l": [{"t": 0}, {"a": 1}]})),
        ("tree-float-garbage", set_(("shards", 0, "tree"), {"l": [{"t": 0}, {"f": "zz"}]})),
        ("extra-not-object", set_(("extra",), [1])),
        ("created-not-number", set_(("created_unix_s",), [1])),
        ("created-huge-int", set_(("created_unix_s",), 10**400)),
        ("created-nan-text", set_(("created_unix_s",), "nan")),
        ("created-infinity", set_(("created_unix_s",), math.inf)),
        ("created-nan", set_(("created_unix_s",), math.nan)),
    ]


MUTATIONS = _mutations()


def test_the_unmutated_manifest_is_valid() -> None:
    assert Manifest.from_obj(good_obj()) == manifest()


@pytest.mark.parametrize("mutate", [m for _, m in MUTATIONS], ids=[i for i, _ in MUTATIONS])
def test_hostile_manifest_is_a_value_error(mutate: Any) -> None:
    obj = good_obj()
    mutate(obj)
    data = json.dumps(obj)
    with pytest.raises(ValueError) as info:
        Manifest.from_json(data)
    assert str(info.value)  # says what is wrong


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b"null", b"42", b'"str"', b"\xff\xfe", b"{" * 10, b"[" * 100_000,
    b'{"schema_version": 1}', b'{"schema_version": 1, "job": "j", "step": 1e999, "world_size": 1, "shards": []}',
    b'{"schema_version": 1, "job": "j", "step": 1, "world_size": 1, "shards": [], "created_unix_s": "x"}',
])
def test_malformed_manifest_bytes(data: bytes) -> None:
    with pytest.raises(ValueError):
        Manifest.from_json(data)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_are_refused(token: str) -> None:
    """Canonical JSON never writes them, so a manifest holding one was not written by ckptd."""
    text = json.dumps(good_obj())
    assert '"extra": {' in text and '"created_unix_s": 1700000000.25' in text
    with pytest.raises(ValueError):
        Manifest.from_json(text.replace('"extra": {', f'"extra": {{"bad": {token}, '))
    with pytest.raises(ValueError):
        Manifest.from_json(text.replace('"created_unix_s": 1700000000.25', f'"created_unix_s": {token}'))


@pytest.mark.parametrize("depth", [MAX_TREE_DEPTH + 1, 500, 990, 5000])
def test_deeply_nested_tree_in_a_manifest(depth: int) -> None:
    obj = good_obj()
    obj["shards"][0]["tree"] = {"l": [{"t": 0}]}
    text = json.dumps(obj).replace('{"l": [{"t": 0}]}', '{"l": [' * depth + '{"t": 0}' + "]}" * depth)
    with pytest.raises(ValueError):
        Manifest.from_json(text)


def test_world_size_mismatch_in_shard_list() -> None:
    obj = good_obj()
    obj["world_size"] = 3
    with pytest.raises(ValueError, match="ranks"):
        Manifest.from_obj(obj)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_field_corruption_is_a_value_error_or_still_valid(data: st.DataObject) -> None:
    """Replace one random node of a valid manifest with random JSON: ValueError or a valid manifest."""
    obj = good_obj()
    paths: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(obj, ())
    path = data.draw(st.sampled_from(paths[1:]))
    value = data.draw(json_values)
    cur: Any = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    try:
        m = Manifest.from_json(json.dumps(obj))
    except ValueError:
        return
    # Accepted: it must be self-consistent and re-encode to a manifest that parses the same way.
    assert sorted(s.rank for s in m.shards) == list(range(m.world_size))
    for s in m.shards:
        assert len(s.chunk_crc32c) == chunk_count(s.nbytes, s.chunk_bytes)
        validate_tensors(list(s.tensors), s.nbytes)
    encoded = m.to_json()  # whatever was accepted can be written back canonically...
    again = Manifest.from_json(encoded)
    assert again.to_json() == encoded  # ...and re-reads to the same bytes


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
    import ckptd.layout as layout

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


# -- retention ---------------------------------------------------------------------------------

steps_st = st.lists(st.integers(min_value=0, max_value=10**6), max_size=30)


@settings(max_examples=200, deadline=None)
@given(steps_st, st.integers(min_value=-3, max_value=12), st.integers(min_value=-2, max_value=20),
       st.lists(st.integers(min_value=0, max_value=10**6), max_size=5))
def test_retention_properties(committed: list[int], max_to_keep: int, keep_period: int, pinned: list[int]) -> None:
    doomed = select_for_deletion(committed, max_to_keep, keep_period, pinned)
    steps = sorted(set(committed))
    assert doomed == sorted(doomed) and len(set(doomed)) == len(doomed)
    assert set(doomed) <= set(steps)
    if not steps:
        assert doomed == []
        return
    assert steps[-1] not in doomed  # never the newest, whatever the arguments say
    newest_kept = steps[-max(1, max_to_keep):]
    assert not set(newest_kept) & set(doomed)
    assert not set(pinned) & set(doomed)
    if keep_period > 0:
        assert all(s % keep_period for s in doomed)
    # exactly the rest is deleted
    must_keep = set(newest_kept) | set(pinned) | ({s for s in steps if s % keep_period == 0} if keep_period > 0
                                                  else set())
    assert doomed == [s for s in steps if s not in must_keep]


@settings(max_examples=100, deadline=None)
@given(steps_st, st.integers(min_value=1, max_value=10))
def test_retention_is_idempotent(committed: list[int], max_to_keep: int) -> None:
    doomed = select_for_deletion(committed, max_to_keep)
    left = sorted(set(committed) - set(doomed))
    assert select_for_deletion(left, max_to_keep) == []
    assert len(left) == min(len(set(committed)), max_to_keep)


@pytest.mark.parametrize("committed,kw,expected", [
    ([], {"max_to_keep": 3}, []),
    ([5], {"max_to_keep": 0}, []),
    ([1, 2, 3, 4, 5], {"max_to_keep": 2}, [1, 2, 3]),
    ([1, 2, 3, 4, 5], {"max_to_keep": 0}, [1, 2, 3, 4]),
    ([5, 1, 3, 3, 2, 4], {"max_to_keep": 2}, [1, 2, 3]),
    ([10, 20, 25, 30, 35], {"max_to_keep": 1, "keep_period": 10}, [25]),
    ([1, 2, 3, 4, 5], {"max_to_keep": 1, "pinned": [2, 99]}, [1, 3, 4]),
])
def test_retention_examples(committed: list[int], kw: dict[str, Any], expected: list[int]) -> None:
    assert select_for_deletion(committed, **kw) == expected
