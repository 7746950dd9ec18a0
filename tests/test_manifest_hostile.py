"""Manifests as hostile input: pure code, no daemon.

``from_json`` treats a manifest as hostile input: anything malformed (each single-field mutation of
a valid manifest, malformed bytes, non-finite numbers, trees nested too deep, a shard list that
does not match the world size) is a ValueError saying what is wrong, never another exception; a
random corruption of any one field is either refused that way or accepted as a self-consistent
manifest that re-encodes canonically.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.core.layout import MAX_TREE_DEPTH, chunk_count, validate_tensors
from ckptd.core.manifest import Manifest
from ckptd.core.types import MAX_NDIM, MAX_STEP
from tests._manifest_kit import manifest


def good_obj() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(manifest().to_json())
    return obj


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
