"""Child of test_object_crash_enumeration.py: the object tier's life of a fine-tuning job, killed
by a failpoint somewhere in it (``CKPTD_FAILPOINTS``).

``python -m tests.fault.object_crash_child ENDPOINT BUCKET PREFIX``: steps 1..3 of one rank (a
frozen base and changing adapters, so later steps reference step 1's chunks), each put, committed
and acknowledged on stdout (``ack N``), retention keeping one step (``delete N`` printed before
each delete), then a gc sweep. Deterministic: ``step_bytes(step)`` rebuilds any step's bytes.
"""

from __future__ import annotations

import random
import sys

from ckptd.core.config import ObjectSection
from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.tiers.object import ObjectTier

JOB = "crash-ft"
CHUNK = 64 * 1024
BASE = random.Random(0).randbytes(3 * CHUNK)  # frozen: the same bytes at every step


def step_bytes(step: int) -> bytes:
    return random.Random(step).randbytes(CHUNK // 2) + BASE  # adapters first, then the base


def entry_of(data: bytes) -> ShardEntry:
    n = len(data)
    return ShardEntry(0, n, CHUNK, tuple(chunk_crcs(data, CHUNK)), (TensorEntry("w", "uint8", (n,), 0, n),),
                      {"d": [["w", {"t": 0}]]})


def make_tier(endpoint: str, bucket: str, prefix: str) -> ObjectTier:
    return ObjectTier(ObjectSection(enabled=True, preset="minio", endpoint_url=endpoint, region="us-east-1",
                                    bucket=bucket, prefix=prefix, max_concurrency=2, max_attempts=2,
                                    total_timeout_s=30.0))


def save(tier: ObjectTier, step: int) -> None:
    data = step_bytes(step)
    entry = entry_of(data)
    tier.put_shard(JOB, step, entry, memoryview(data))
    tier.commit(Manifest(JOB, step, 1, (entry,), created_unix_s=float(step)))


def main() -> None:
    tier = make_tier(*sys.argv[1:4])
    for step in (1, 2, 3):
        save(tier, step)
        print(f"ack {step}", flush=True)
        for old in tier.list_committed(JOB)[:-1]:
            print(f"delete {old}", flush=True)
            tier.delete(JOB, old)
    tier.sweep(JOB, older_than_s=0)
    print("done", flush=True)
    tier.close()


if __name__ == "__main__":
    main()
