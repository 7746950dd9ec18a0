"""Helpers shared by the tier tests: page-aligned payloads, shard entries, and a step put and
committed through the Tier protocol alone (so a test of any tier can use them)."""

from __future__ import annotations

import mmap
import random

from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.tiers.base import Tier

CHUNK = 4096
JOB = "conf-job"


def payload(nbytes: int, seed: int) -> memoryview:
    """nbytes of random data in a page-aligned anonymous mapping (like a shm slot)."""
    mm = mmap.mmap(-1, max(nbytes, 1))
    mm[:nbytes] = random.Random(seed).randbytes(nbytes)
    return memoryview(mm)[:nbytes]


def entry_for(rank: int, data: memoryview) -> ShardEntry:
    n = data.nbytes
    tensors = (TensorEntry("blob", "uint8", (n,), 0, n),) if n else ()
    tree = {"d": [["blob", {"t": 0}]]} if n else {"d": []}
    return ShardEntry(rank, n, CHUNK, tuple(chunk_crcs(data, CHUNK)), tensors, tree)


def save_step(tier: Tier, job: str, step: int, sizes: list[int], commit: bool = True) -> tuple[Manifest, list[bytes]]:
    """put_shard every rank (sizes[r] bytes) and commit; return the manifest and the bytes."""
    entries, blobs = [], []
    for rank, n in enumerate(sizes):
        data = payload(n, seed=step * 1000 + rank)
        entry = entry_for(rank, data)
        tier.put_shard(job, step, entry, data)
        entries.append(entry)
        blobs.append(bytes(data))
    m = Manifest(job, step, len(sizes), tuple(entries), created_unix_s=1234.5, extra={"k": "v"})
    if commit:
        tier.commit(m)
    return m, blobs


def read(tier: Tier, job: str, step: int, entry: ShardEntry) -> bytes:
    dst = memoryview(bytearray(entry.nbytes + 100))  # larger than the shard, like a slot
    tier.read_shard_into(job, step, entry, dst)
    return bytes(dst[: entry.nbytes])
