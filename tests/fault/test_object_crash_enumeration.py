"""Crash points of the object tier's upload, commit and garbage collection (SIGKILL at each).

The child (object_crash_child.py) saves three steps of a fine-tuning job (later steps reference
step 1's chunks), retention keeping one, then sweeps. It runs once with ``CKPTD_FAILPOINTS_LOG``
to count the hits of every object failpoint, then killed at the first and the last hit of every
point (``kill@N``). After each kill a fresh tier (an empty node) checks:

- every step whose commit was acknowledged is still committed, unless retention had started
  deleting it (``delete N`` printed);
- every committed step restores bit-exact (its chunks, shared or not, are all there);
- a gc sweep (age 0) then leaves only objects that committed manifests reference, every
  committed step still restores, and a new step commits and restores (dedup against what is left).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from tests.fault.object_crash_child import JOB, make_tier, save, step_bytes
from tests.tiers._moto import MotoS3

REPO = Path(__file__).resolve().parents[2]
POINTS = ("object.upload.chunk", "object.commit.checked", "object.commit.after_manifest",
          "object.gc.after_uncommit", "object.gc.after_delete")


def run_child(moto_s3: MotoS3, prefix: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.fault.object_crash_child", moto_s3.endpoint_url,
                           moto_s3.bucket, prefix], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def keys(client: Any, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def check_committed(tier: Any, acked: set[int], deleting: set[int]) -> list[int]:
    steps = tier.list_committed(JOB)
    assert acked - deleting <= set(steps), (acked, deleting, steps)
    for step in steps:
        entry = tier.read_manifest(JOB, step).shard(0)
        buf = bytearray(entry.nbytes)
        tier.read_shard_into(JOB, step, entry, memoryview(buf))
        assert bytes(buf) == step_bytes(step), step
    return steps


def test_sigkill_at_every_object_failpoint(moto_s3: MotoS3, tmp_path: Path) -> None:
    log = tmp_path / "hits.log"
    full = run_child(moto_s3, f"crash-{uuid.uuid4().hex[:8]}", {"CKPTD_FAILPOINTS_LOG": str(log)})
    assert full.returncode == 0, full.stderr
    hits = Counter(line for line in log.read_text().split() if line in POINTS)
    assert set(hits) == set(POINTS), hits  # the workload passes every point
    client = moto_s3.client()
    runs = 0
    for point in POINTS:
        for k in sorted({1, hits[point]}):  # the first and the last hit
            prefix = f"crash-{uuid.uuid4().hex[:8]}"
            proc = run_child(moto_s3, prefix, {"CKPTD_FAILPOINTS": f"{point}=kill@{k}"})
            assert proc.returncode == -9, (point, k, proc.returncode, proc.stderr[-2000:])
            lines = proc.stdout.split()
            acked = {int(n) for w, n in zip(lines, lines[1:]) if w == "ack"}
            deleting = {int(n) for w, n in zip(lines, lines[1:]) if w == "delete"}
            tier = make_tier(moto_s3.endpoint_url, moto_s3.bucket, prefix)
            try:
                check_committed(tier, acked, deleting)
                tier.sweep(JOB, older_than_s=0)
                steps = check_committed(tier, acked, deleting)
                assert keys(client, moto_s3.bucket, tier.base) == tier.referenced(JOB) | {
                    tier.manifest_key(JOB, s) for s in steps}, (point, k)
                save(tier, 4)  # the job goes on
                assert 4 in check_committed(tier, acked, deleting)
            finally:
                tier.close()
            runs += 1
    print(f"object crash enumeration: {runs} SIGKILLs over {dict(hits)}")
