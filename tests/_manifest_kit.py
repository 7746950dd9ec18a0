"""Helpers shared by the manifest test modules (tests/test_manifest_*.py, tests/test_layout.py).

``manifest()`` builds the same valid manifest every time: ``world_size`` shards of growing size
(``shard()``: deterministic bytes, their chunk crc32c list, one float32 tensor and a tree with a
float and a non-string key once the shard is large enough), a fixed creation time and a non-ASCII
``extra``. ``CHUNK`` is the integrity chunk size they use.
"""

from __future__ import annotations

from typing import Any

from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest, ShardEntry

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
