"""Compression, deduplication, garbage collection and old-format steps of the object tier, on
moto's S3 server. States are tiny (tens to hundreds of KiB, 64 KiB chunks): the 1 Gbit/s
figures come from bench/object.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ckptd.core.config import ObjectSection, validate_object
from ckptd.core.errors import IntegrityError, InvalidArgument
from ckptd.core.manifest import Manifest
from ckptd.tiers.object import ObjectTier
from ckptd.tiers.object_codec import MIN_COMPRESS_BYTES, RAW, CodecChooser, decode_into, encode, shuffle
from tests.linkproxy import LinkProxy
from tests.state_factory import finetune_state, gpt_state, state_shard
from tests.tiers._moto import MotoS3, TierFactory, manifest_of, pattern, read_back

JOB = "gpt-tiny"
CHUNK = 64 * 1024
FIXTURE = Path(__file__).parent / "fixtures" / "object-v0"


def keys_under(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def save(tier: ObjectTier, step: int, state: dict[str, Any], chunk_bytes: int = CHUNK) -> tuple[Manifest, bytes]:
    entry, data = state_shard(0, state, chunk_bytes)
    tier.put_shard(JOB, step, entry, memoryview(data))
    tier.commit(manifest_of(JOB, step, [entry]))
    return tier.read_manifest(JOB, step), data


# -- codecs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "nbytes"), [(1, 100_000), (2, 100_001), (4, 100_003)])
def test_codec_round_trip_with_a_partial_trailing_element(width: int, nbytes: int) -> None:
    rng = np.random.default_rng(width)
    data = (rng.standard_normal(nbytes // 4 + 1, dtype=np.float32) * 0.02).tobytes()[:nbytes]
    codec, stored = encode(memoryview(data), width, 1)
    assert codec == ("zstd" if width == 1 else f"zstd-shuf{width}") and len(stored) < nbytes
    out = bytearray(nbytes)
    decode_into(codec, bytes(stored), memoryview(out), "chunk")
    assert out == data
    assert shuffle(memoryview(b"abcdefg"), 2) == b"acebdfg"  # byte planes, then the odd byte


def test_random_and_small_chunks_are_stored_raw() -> None:
    rnd = np.random.default_rng(0).bytes(MIN_COMPRESS_BYTES * 2)
    assert encode(memoryview(rnd), 1, 3)[0] == "raw"
    assert encode(memoryview(bytes(MIN_COMPRESS_BYTES - 1)), 1, 3)[0] == "raw"  # zeros, but too small
    assert encode(memoryview(bytes(MIN_COMPRESS_BYTES)), 1, RAW)[0] == "raw"


def test_damaged_or_hostile_stored_bytes_are_integrity_errors() -> None:
    data = bytes(200_000)
    codec, stored = encode(memoryview(data), 1, 1)
    out = memoryview(bytearray(len(data)))
    with pytest.raises(IntegrityError, match="does not decompress"):
        decode_into(codec, b"\x00" + bytes(stored)[1:], out, "s3://b/k")
    with pytest.raises(IntegrityError, match="not the chunk's"):
        decode_into(codec, bytes(stored), memoryview(bytearray(len(data) - 1)), "s3://b/k")  # bounded output
    with pytest.raises(IntegrityError, match="raw chunk"):
        decode_into("raw", b"abc", memoryview(bytearray(4)), "s3://b/k")


def test_chooser_stores_raw_when_the_cpu_not_the_link_is_the_limit() -> None:
    fast_link = CodecChooser(1)
    for _ in range(4):
        fast_link.observe_encode(1, 2**20, 700_000, 0.010)  # 100 MB/s compressing, 0.67 ratio
        fast_link.observe_put(2**20, 0.001)  # 1 GB/s per request
    assert [fast_link.choose() for _ in range(15)] == [RAW] * 15  # compressing costs more than it saves
    slow_link = CodecChooser(1)
    for _ in range(4):
        slow_link.observe_encode(1, 2**20, 700_000, 0.010)
        slow_link.observe_put(2**20, 0.100)  # 10 MB/s per request
    assert [slow_link.choose() for _ in range(15)] == [1] * 15
    assert CodecChooser(3, "off").choose() == RAW and CodecChooser(3, "on").choose() == 3


def test_config_checks_compression_and_upload_cap() -> None:
    for bad in ({"compression": "fast"}, {"compression_level": 0}, {"compression_level": 20},
                {"max_upload_mbit": -1.0}):
        with pytest.raises(InvalidArgument, match="object."):
            validate_object(ObjectSection(**bad))  # type: ignore[arg-type]


# -- the tier --------------------------------------------------------------------------------------
def test_gpt_state_is_stored_compressed_and_restores_exactly_on_an_empty_node(
    make_tier: TierFactory, s3_client: Any
) -> None:
    tier = make_tier(compression="on")
    m, data = save(tier, 1, gpt_state(1, 100_000), chunk_bytes=256 * 1024)  # 1.4 MB
    codecs = {c.codec for c in m.shards[0].chunks}
    assert {"zstd-shuf2", "zstd-shuf4"} <= codecs  # bf16 weights and fp32 state, as byte planes
    stored = sum(keys_under(s3_client, tier.bucket, tier.step_prefix(JOB, 1)).values())
    assert stored < 0.9 * len(data)  # random mantissas: ~0.86 at 256 KiB chunks, ~0.84 at 16 MiB
    assert m.shards[0].stored_bytes == tier.stats.stored_bytes
    fresh = make_tier(hashed_prefixes=4)  # another node, configured differently: reads the recorded keys
    assert read_back(fresh, JOB, 1, 0) == data


def test_frozen_base_is_not_uploaded_again_and_survives_the_deletion_of_its_step(
    make_tier: TierFactory, s3_client: Any
) -> None:
    tier = make_tier(max_concurrency=2)
    m1, d1 = save(tier, 1, finetune_state(7, 1, 320_000))  # 640 KB base, 70 KB adapters
    before = tier.stats.stored_bytes
    m2, d2 = save(tier, 2, finetune_state(7, 2, 320_000))
    uploaded = tier.stats.stored_bytes - before
    assert uploaded <= 0.2 * len(d2)  # the base's chunks are referenced, not uploaded
    shared = [c.object_key for c in m2.shards[0].chunks if "/step-000000000001/" in c.object_key]
    assert len(shared) >= len(m2.shards[0].chunks) // 2
    tier.delete(JOB, 1)  # retention: step 1 goes, the chunks step 2 references stay
    assert tier.list_committed(JOB) == [2]
    left = keys_under(s3_client, tier.bucket, tier.step_prefix(JOB, 1))
    assert set(left) == set(shared)
    assert read_back(make_tier(), JOB, 2, 0) == d2  # an empty node restores it, bit-exact
    tier.delete(JOB, 2)
    assert keys_under(s3_client, tier.bucket, tier.base) == {}  # nothing is referenced any more
    del m1, d1


def test_gc_sweep_spares_live_uploads_and_referenced_chunks(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier()
    save(tier, 1, finetune_state(3, 1, 32_000))
    entry, data = state_shard(0, finetune_state(3, 2, 32_000), CHUNK)
    tier.put_shard(JOB, 2, entry, memoryview(data))  # uploaded, never committed (a crash before commit)
    orphan = set(keys_under(s3_client, tier.bucket, tier.step_prefix(JOB, 2)))
    assert orphan
    assert tier.sweep(JOB, older_than_s=3600) == []  # young: may be a live upload
    assert sorted(tier.sweep(JOB, older_than_s=0)) == sorted(orphan)
    assert read_back(make_tier(), JOB, 1, 0) == state_shard(0, finetune_state(3, 1, 32_000), CHUNK)[1]


def test_manifest_naming_a_chunk_of_another_job_is_refused(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier()
    m, _ = save(tier, 1, gpt_state(2, 20_000))
    obj = json.loads(m.to_json())
    obj["shards"][0]["chunks"][0]["key"] = obj["shards"][0]["chunks"][0]["key"].replace(JOB, "victim")
    s3_client.put_object(Bucket=tier.bucket, Key=tier.manifest_key(JOB, 1), Body=json.dumps(obj).encode())
    hostile = tier.read_manifest(JOB, 1)
    with pytest.raises(IntegrityError, match="outside this tier's layout"):
        tier.read_shard_into(JOB, 1, hostile.shard(0), memoryview(bytearray(hostile.shard(0).nbytes)))
    with pytest.raises(IntegrityError, match="outside this tier's layout"):
        tier.delete(JOB, 1)
    assert tier.list_committed(JOB) == [1]  # nothing was deleted


def test_step_written_before_chunking_still_restores_and_deletes(
    make_tier: TierFactory, moto_s3: MotoS3, s3_client: Any, tmp_path: Path
) -> None:
    """tests/tiers/fixtures/object-v0: a step saved by the tier before this change (one object per
    shard, no chunk records), prefix 'legacy', dumped object by object."""
    tier = make_tier()
    prefix = tier.base.rstrip("/")
    for path in sorted(p for p in FIXTURE.rglob("*") if p.is_file()):
        rel = path.relative_to(FIXTURE / "legacy").as_posix()
        body = path.read_bytes().replace(b'"legacy/', f'"{prefix}/'.encode())  # recorded keys, rebased
        s3_client.put_object(Bucket=tier.bucket, Key=f"{prefix}/{rel}", Body=body)
    assert tier.list_committed("old-job") == [40]
    m = tier.read_manifest("old-job", 40)
    assert all(not s.chunks and s.object_key for s in m.shards)
    assert read_back(tier, "old-job", 40, 0) == pattern(70_000, 1)
    assert read_back(tier, "old-job", 40, 1) == pattern(1000, 2)
    tier.delete("old-job", 40)
    assert keys_under(s3_client, tier.bucket, tier.base) == {}
    del moto_s3, tmp_path


def test_upload_cap_and_a_slow_link(make_tier: TierFactory, moto_s3: MotoS3) -> None:
    """max_upload_mbit paces this node's PUTs; through a throttled link (tests/linkproxy.py)
    compression makes the upload faster than the raw bytes would be."""
    data_state = gpt_state(5, 400_000)["model"]  # 800 KB of bf16 weights
    host, port = moto_s3.endpoint_url.removeprefix("http://").split(":")
    with LinkProxy(host, int(port), rate_mbit=10.0, latency_s=0.002) as link:
        times = {}
        for mode in ("off", "on"):
            tier = make_tier(endpoint_url=link.url, compression=mode, prefix=f"link-{mode}-{time.time_ns()}")
            entry, data = state_shard(0, data_state, 256 * 1024)
            t0 = time.perf_counter()
            tier.put_shard(JOB, 1, entry, memoryview(data))
            times[mode] = time.perf_counter() - t0
        assert times["on"] < 0.85 * times["off"], times  # ~0.7 of the bytes go through the link
    capped = make_tier(max_upload_mbit=8.0, compression="off")  # 1 MB/s
    entry, data = state_shard(0, gpt_state(6, 40_000), CHUNK)  # 560 KB
    t0 = time.perf_counter()
    capped.put_shard(JOB, 1, entry, memoryview(data))
    assert time.perf_counter() - t0 >= 0.4 and capped.stats.throttled_s > 0.3
