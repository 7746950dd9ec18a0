"""What the object tier sends to the store, counted (botocore's before-call events on a real S3
endpoint, moto over HTTP): the requests behind the bounds in docs/scale.md.

A node waiting for a step's commit sends one HEAD per look, never a listing of the job's keys;
each node writes one record for all its ranks and the coordinator reads each record once; the
records are checked (ranks, chunk keys) and the older one-record-per-rank form still reads; the
interval between commit checks grows with the job so the nodes stay under the request bound; an
upload finds the step to deduplicate against without listing the job's chunks.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from ckptd.core.errors import IntegrityError, InvalidArgument
from ckptd.core.manifest import ChunkRef
from ckptd.tiers.object import ObjectTier
from tests.tiers._moto import TierFactory, manifest_of, pattern, read_back, save_step, shard_entry

JOB = "llama-7b"


def _count_calls(tier: ObjectTier) -> dict[str, int]:
    """The S3 operations the tier's client sends from now on, by name (botocore's own event)."""
    calls: dict[str, int] = {}

    def count(model: Any, **_: Any) -> None:
        calls[model.name] = calls.get(model.name, 0) + 1
    tier._store.client.meta.events.register("before-call.s3", count)
    return calls


def test_waiting_for_a_commit_costs_one_head_and_each_record_is_read_once(make_tier: TierFactory) -> None:
    """What every waiting node and the coordinator send per look (docs/scale.md): a node asks for
    the step's manifest with one HEAD, never a listing of the job's keys; each node writes one
    record for all its ranks; the coordinator lists the step and reads only the records it has
    not read yet."""
    tier = make_tier()
    save_step(tier, JOB, 1, [pattern(1000, 1)])  # an older committed step: a job listing would page over it
    shards = [pattern(3000, r) for r in range(3)]
    entries = [shard_entry(r, d) for r, d in enumerate(shards)]
    for e, d in zip(entries, shards):
        tier.put_shard(JOB, 2, e, memoryview(d))
    tier.put_shard_meta(JOB, 2, [entries[1], entries[0]], 3)  # a node with ranks 0 and 1: one object
    calls = _count_calls(tier)
    assert not tier.is_committed(JOB, 2)
    assert calls == {"HeadObject": 1}
    calls.clear()
    first = tier.list_shard_metas(JOB, 2, 3)
    assert calls == {"ListObjectsV2": 1, "GetObject": 1}
    # The node's one record carries every entry's chunk records (the keys this tier stored).
    assert {r: dataclasses.replace(e, chunks=()) for r, e in first.items()} == {0: entries[0], 1: entries[1]}
    for r, e in first.items():
        assert [c.object_key for c in e.chunks] == [tier.chunk_object_key(JOB, 2, r, 0)]
    tier.put_shard_meta(JOB, 2, [entries[2]], 3)  # the other node
    calls.clear()
    rest = tier.list_shard_metas(JOB, 2, 3, skip=tuple(first))
    assert list(rest) == [2] and rest[2].chunks and calls == {"ListObjectsV2": 1, "GetObject": 1}
    tier.commit(manifest_of(JOB, 2, entries))
    calls.clear()
    assert tier.is_committed(JOB, 2) and tier.is_committed(JOB, 1) and not tier.is_committed(JOB, 3)
    assert calls == {"HeadObject": 3}


def test_records_are_checked_and_old_rank_records_still_read(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier()
    data = pattern(2000, 4)
    e0, e1 = shard_entry(0, data), shard_entry(1, data)
    old = json.dumps({"world_size": 2, "shard": e1.to_json()}).encode()  # one record per rank, as before
    s3_client.put_object(Bucket=tier.bucket, Key=tier.shard_meta_key(JOB, 5, 1), Body=old)
    tier.put_shard_meta(JOB, 5, [e0], 2)
    assert tier.list_shard_metas(JOB, 5, 2) == {0: e0, 1: e1}
    misnamed = json.dumps({"world_size": 2, "shards": [e1.to_json()]}).encode()  # names rank 1, keyed as 0
    s3_client.put_object(Bucket=tier.bucket, Key=tier.shard_meta_key(JOB, 6, 0), Body=misnamed)
    with pytest.raises(IntegrityError, match="record names ranks"):
        tier.list_shard_metas(JOB, 6, 2)
    with pytest.raises(InvalidArgument):
        tier.put_shard_meta(JOB, 7, [], 2)
    # Every entry of a node's record has its chunk keys checked, not only the first one's.
    foreign = dataclasses.replace(e1, chunks=(ChunkRef("other-job/step-000000000007/rank-000001.shard.c000000",
                                                       "raw", 2000, "0" * 64),))
    with pytest.raises(IntegrityError, match="outside"):
        tier.put_shard_meta(JOB, 7, [e0, foreign], 2)
    assert tier.list_shard_metas(JOB, 7, 2) == {}


def test_waiting_nodes_check_less_often_in_a_large_job() -> None:
    from ckptd.drains.upload import COMMIT_CHECKS_PER_S, POLL_S, check_interval_s

    assert check_interval_s(8) == POLL_S
    for world in (8_000, 32_000, 80_000):  # 1 rank per node at most: the job's nodes ask <= the bound
        nodes = world
        assert nodes / check_interval_s(world) <= COMMIT_CHECKS_PER_S


def test_dedup_finds_the_newest_step_without_listing_the_jobs_chunks(make_tier: TierFactory) -> None:
    """An upload looks for the step to deduplicate against with one delimited listing of the
    job's step folders and HEADs of their manifests, once per step for all of a node's ranks:
    never a listing of every chunk key of the job (docs/scale.md)."""
    tier = make_tier()
    shards = [pattern(600 * 1024, r) for r in range(3)]
    save_step(tier, JOB, 1, shards)
    tier.put_shard(JOB, 2, shard_entry(0, shards[0]), memoryview(shards[0]))  # uncommitted: skipped below
    calls = _count_calls(tier)
    m = save_step(tier, JOB, 3, shards)  # the same bytes: every chunk references step 1's
    assert calls["ListObjectsV2"] == 1 and calls["PutObject"] == 1  # the manifest; no chunk uploaded
    assert all("/step-000000000001/" in c.object_key for s in tier.read_manifest(JOB, 3).shards for c in s.chunks)
    assert [read_back(tier, JOB, 3, r) for r in range(3)] == shards and m.step == 3
