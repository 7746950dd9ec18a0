"""Manifest encoding: pure code, no daemon.

Canonical JSON is byte-stable (sorted keys, pure ASCII) and refuses non-finite floats; a manifest's
bytes do not depend on the order of its shards or on the build; manifests (empty shards included)
round-trip through ``to_json``/``from_json`` to equal objects and identical bytes.
"""

from __future__ import annotations

import json
import math

import pytest

from ckptd.core.manifest import SCHEMA_VERSION, Manifest, canonical_json
from tests._manifest_kit import manifest, shard

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
