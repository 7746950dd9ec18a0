"""Object tier contract against a real S3 endpoint over HTTP (moto server on 127.0.0.1).

The same contract as the disk tier: data first, manifest last and create-only; only committed
steps are listed; reads are bit-exact and every mismatch (flipped byte, truncation, a manifest
pointing outside the layout) is an IntegrityError naming the object; delete un-commits first.
Plus what only the object tier has: multipart, hashed prefixes, cleanup of stale multipart
uploads, presets, the [object] config section, and credentials never reaching the logs. The
requests the tier sends (commit checks, records, dedup) are counted in test_object_requests.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ckptd.core import config
from ckptd.core.config import ObjectSection
from ckptd.core.errors import AlreadyExists, IntegrityError, InvalidArgument, NotFound, TierFailed
from ckptd.core.manifest import Manifest
from ckptd.tiers.object import ObjectTier
from ckptd.tiers.object_io import MemoryReader as _MemoryReader
from tests.tiers._moto import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    MiB,
    MotoS3,
    TierFactory,
    keys_under,
    manifest_of,
    pattern,
    read_back,
    save_step,
    shard_entry,
)

JOB = "llama-7b"


# -- the Tier contract -----------------------------------------------------------------------


def test_put_commit_then_list_and_read_exact(make_tier: TierFactory) -> None:
    tier = make_tier()
    shards = [random.Random(1).randbytes(1_000_003), random.Random(2).randbytes(300_000), b""]  # no equal chunks
    m = save_step(tier, JOB, 7, shards)
    assert tier.list_jobs() == [JOB]
    assert tier.list_committed(JOB) == [7]
    got = tier.read_manifest(JOB, 7)
    assert got.world_size == 3 and got.extra == {"lr": 0.1}
    for s in got.shards:  # the object tier's manifest records each chunk's full key (none when empty)
        assert s.object_key == ""
        assert [c.object_key for c in s.chunks] == [tier.chunk_object_key(JOB, 7, s.rank, i)
                                                    for i in range(len(s.chunk_crc32c))]
        assert all(c.object_key.startswith(f"{tier.base}{JOB}/step-000000000007/{s.key}.c") for c in s.chunks)
    assert [s.chunk_crc32c for s in got.shards] == [s.chunk_crc32c for s in m.shards]
    for rank, data in enumerate(shards):
        assert read_back(tier, JOB, 7, rank) == data


def test_steps_without_manifest_are_not_listed(make_tier: TierFactory) -> None:
    tier = make_tier()
    save_step(tier, JOB, 1, [pattern(1000, 1)])
    data = pattern(2000, 2)
    tier.put_shard(JOB, 2, shard_entry(0, data), memoryview(data))
    assert tier.list_committed(JOB) == [1]
    with pytest.raises(NotFound):
        tier.read_manifest(JOB, 2)
    assert tier.list_committed("other-job") == []


def test_commit_twice_is_already_exists(make_tier: TierFactory) -> None:
    tier = make_tier()
    m = save_step(tier, JOB, 3, [pattern(5000, 1)])
    assert tier.conditional_put_supported()  # moto honours If-None-Match
    with pytest.raises(AlreadyExists, match="already committed: s3://"):
        tier.commit(m)
    with pytest.raises(AlreadyExists):  # a different manifest for the same step too
        tier.commit(manifest_of(JOB, 3, [shard_entry(0, pattern(5000, 1), chunk_bytes=4096)]))
    with pytest.raises(AlreadyExists):  # and no shard of a committed step is overwritten
        tier.put_shard(JOB, 3, m.shards[0], memoryview(pattern(5000, 9)))
    assert read_back(tier, JOB, 3, 0) == pattern(5000, 1)


def test_commit_with_a_missing_or_short_shard_fails(make_tier: TierFactory) -> None:
    tier = make_tier()
    a, b = pattern(4000, 1), pattern(4000, 2)
    entries = [shard_entry(0, a), shard_entry(1, b)]
    tier.put_shard(JOB, 4, entries[0], memoryview(a))
    with pytest.raises(TierFailed, match="rank-000001.shard missing"):
        tier.commit(manifest_of(JOB, 4, entries))
    tier.put_shard(JOB, 4, entries[1], memoryview(b[:-1] + b"x"))  # right size, wrong bytes
    longer = shard_entry(1, b + b"!")
    with pytest.raises(IntegrityError, match="size 4000 != 4001"):
        tier.commit(manifest_of(JOB, 4, [entries[0], longer]))
    assert tier.list_committed(JOB) == []
    with pytest.raises(ValueError, match="bytes given"):
        tier.put_shard(JOB, 4, entries[0], memoryview(a[:10]))


def test_flipped_byte_is_integrity_error_naming_the_key(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier()
    data = random.Random(3).randbytes(3 * MiB + 17)  # random: stored raw
    save_step(tier, JOB, 5, [data], chunk_bytes=MiB)
    key = tier.chunk_object_key(JOB, 5, 0, 2)
    bad = bytearray(data[2 * MiB : 3 * MiB])
    bad[5] ^= 0x01
    s3_client.put_object(Bucket=tier.bucket, Key=key, Body=bytes(bad))
    entry = tier.read_manifest(JOB, 5).shard(0)
    with pytest.raises(IntegrityError, match=rf"{key}: crc32c mismatch in chunk 2 \(offset {2 * MiB}\)"):
        tier.read_shard_into(JOB, 5, entry, memoryview(bytearray(entry.nbytes)))


def test_truncated_or_missing_object(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier()
    data = random.Random(4).randbytes(100_000)  # one raw chunk
    save_step(tier, JOB, 6, [data])
    key = tier.chunk_object_key(JOB, 6, 0, 0)
    entry = tier.read_manifest(JOB, 6).shard(0)
    s3_client.put_object(Bucket=tier.bucket, Key=key, Body=data[:-1])
    with pytest.raises(IntegrityError, match=rf"{key}: size 99999 != 100000"):
        tier.read_shard_into(JOB, 6, entry, memoryview(bytearray(entry.nbytes)))
    s3_client.delete_object(Bucket=tier.bucket, Key=key)
    with pytest.raises(NotFound, match=key):
        tier.read_shard_into(JOB, 6, entry, memoryview(bytearray(entry.nbytes)))


def test_invalid_or_hostile_manifest(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier()
    m = save_step(tier, JOB, 8, [pattern(1000, 1)])
    mkey = tier.manifest_key(JOB, 8)
    obj = json.loads(m.to_json())
    obj["shards"][0]["object_key"] = f"{tier.base}victim/step-000000000008/rank-000000.shard"
    s3_client.put_object(Bucket=tier.bucket, Key=mkey, Body=json.dumps(obj).encode())
    with pytest.raises(IntegrityError, match="outside this tier's layout"):
        tier.read_manifest(JOB, 8)
    obj["shards"][0]["object_key"] = "../../etc/rank-000000.shard"
    s3_client.put_object(Bucket=tier.bucket, Key=mkey, Body=json.dumps(obj).encode())
    with pytest.raises(IntegrityError, match="invalid object_key"):
        tier.read_manifest(JOB, 8)
    s3_client.put_object(Bucket=tier.bucket, Key=mkey, Body=b"{not json")
    with pytest.raises(IntegrityError, match="invalid manifest"):
        tier.read_manifest(JOB, 8)


def test_delete_removes_the_manifest_first(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier()
    save_step(tier, JOB, 9, [pattern(1000, 1), pattern(1000, 2)])
    save_step(tier, JOB, 10, [pattern(1000, 3), pattern(1000, 4)])
    deleted: list[str] = []
    fail_shards = {"on": True}

    def record(params: dict[str, Any], **_: Any) -> None:
        deleted.append(params["Key"])
        if fail_shards["on"] and ".shard.c" in params["Key"]:
            raise RuntimeError("injected: shard delete fails")

    tier.client.meta.events.register("before-parameter-build.s3.DeleteObject", record)
    with pytest.raises(RuntimeError, match="injected"):
        tier.delete(JOB, 9)
    assert deleted[0] == tier.manifest_key(JOB, 9)
    assert tier.list_committed(JOB) == [10]  # un-committed although its data is still there
    assert keys_under(s3_client, tier.bucket, tier.step_prefix(JOB, 9))
    fail_shards["on"] = False
    tier.delete(JOB, 9)  # an uncommitted step is still removable
    assert keys_under(s3_client, tier.bucket, tier.step_prefix(JOB, 9)) == []
    tier.delete(JOB, 10)
    assert tier.list_committed(JOB) == []
    assert keys_under(s3_client, tier.bucket, tier.base) == []


def test_chunks_are_single_puts_and_parallel_gets(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier(max_concurrency=3)
    data = random.Random(5).randbytes(12 * MiB)
    puts: list[str] = []
    tier.client.meta.events.register("before-parameter-build.s3.PutObject",
                                     lambda params, **_: puts.append(params["Key"]))
    tier.client.meta.events.register("before-parameter-build.s3.UploadPart", lambda **_: pytest.fail("multipart"))
    save_step(tier, JOB, 11, [data], chunk_bytes=MiB)
    chunk_puts = sorted(k for k in puts if ".shard.c" in k)
    assert chunk_puts == [tier.chunk_object_key(JOB, 11, 0, i) for i in range(12)]
    head = s3_client.head_object(Bucket=tier.bucket, Key=chunk_puts[0])
    assert head["ContentLength"] == MiB  # random bytes: stored raw
    assert read_back(tier, JOB, 11, 0) == data


def test_hashed_prefixes_layout(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier(hashed_prefixes=8)
    shards = [pattern(2000 + r, r) for r in range(6)]
    save_step(tier, JOB, 12, shards)
    m = tier.read_manifest(JOB, 12)
    keys = [c.object_key for s in m.shards for c in s.chunks]
    hashed = {k.split("/")[2] for k in keys}
    for s in m.shards:
        for c in s.chunks:
            assert c.object_key.startswith(f"{tier.base}_shards/")
            assert c.object_key.endswith(f"/{JOB}/step-000000000012/{s.key}.c000000")
    assert len(hashed) > 1  # spread over several prefixes
    # manifests stay under one listable prefix; the hashed directory is not a job
    assert keys_under(s3_client, tier.bucket, f"{tier.base}{JOB}/") == [tier.manifest_key(JOB, 12)]
    assert tier.list_jobs() == [JOB]
    # a tier configured differently reads through the recorded keys
    plain = make_tier(hashed_prefixes=0)
    for rank, data in enumerate(shards):
        assert read_back(plain, JOB, 12, rank) == data
    plain.delete(JOB, 12)
    assert keys_under(s3_client, tier.bucket, tier.base) == []


def test_cleanup_incomplete_aborts_stale_multipart_uploads(make_tier: TierFactory, s3_client: Any) -> None:
    tier = make_tier()
    key = tier.shard_object_key(JOB, 13, 0)
    up = s3_client.create_multipart_upload(Bucket=tier.bucket, Key=key)
    s3_client.upload_part(Bucket=tier.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 1024)
    outside = s3_client.create_multipart_upload(Bucket=tier.bucket, Key="not-this-tier/x.shard")

    def uploads() -> list[str]:
        return [u["UploadId"] for u in s3_client.list_multipart_uploads(Bucket=tier.bucket).get("Uploads", ())]

    # moto reports a fixed Initiated in 2010: make the store report real times for this check
    def real_times(parsed: dict[str, Any], **_: Any) -> None:
        for u in parsed.get("Uploads", ()):
            u["Initiated"] = datetime.now(UTC) - timedelta(seconds=60)

    tier.client.meta.events.register("after-call.s3.ListMultipartUploads", real_times)
    assert tier.cleanup_incomplete(older_than_s=3600) == []  # young: could be a live upload
    assert tier.cleanup_incomplete(older_than_s=30) == [(key, up["UploadId"])]
    assert tier.cleanup_incomplete(older_than_s=0) == []
    assert uploads() == [outside["UploadId"]]
    s3_client.abort_multipart_upload(Bucket=tier.bucket, Key="not-this-tier/x.shard", UploadId=outside["UploadId"])
    assert tier.stale_upload_age_s > tier.total_timeout_s


def test_memory_reader_is_a_seekable_view() -> None:
    r = _MemoryReader(memoryview(b"0123456789"))
    assert r.read(3) == b"012" and r.tell() == 3
    assert r.seek(0, 2) == 10 and r.read(5) == b""
    r.seek(8)
    buf = bytearray(4)
    assert r.readinto(buf) == 2 and bytes(buf[:2]) == b"89"
    r.seek(-3, 2)
    assert r.read() == b"789"


# -- presets, config, logs -------------------------------------------------------------------


def test_presets_configure_the_client(moto_s3: MotoS3) -> None:
    oss = ObjectTier(ObjectSection(enabled=True, preset="oss", region="cn-hangzhou", bucket="ckpt"))
    try:
        assert oss.client.meta.endpoint_url == "https://oss-cn-hangzhou.aliyuncs.com"
        cfg = oss.client.meta.config
        assert cfg.s3["addressing_style"] == "virtual"
        assert cfg.request_checksum_calculation == "when_required"
        assert cfg.response_checksum_validation == "when_required"
        assert cfg.retries == {"total_max_attempts": 5, "mode": "standard"}
    finally:
        oss.close()
    minio = ObjectTier(ObjectSection(enabled=True, preset="minio", endpoint_url="http://minio:9000", bucket="ckpt",
                                     retry_mode="adaptive", addressing_style="auto"))
    try:
        assert minio.client.meta.config.s3["addressing_style"] == "auto"  # overridden
        assert minio.client.meta.config.retries["mode"] == "adaptive"
        assert minio.client.meta.config.request_checksum_calculation == "when_supported"
    finally:
        minio.close()


def test_object_config_section() -> None:
    cfg = config.load(None, env={"CKPTD_OBJECT_ENABLED": "true", "CKPTD_OBJECT_BUCKET": "ckpt",
                                 "CKPTD_OBJECT_PART_SIZE_BYTES": "8MiB", "CKPTD_OBJECT_PRESET": "minio"})
    assert cfg.object.enabled and cfg.object.bucket == "ckpt" and cfg.object.part_size_bytes == 8 * MiB
    assert config.load(None, env={}).object == ObjectSection()  # off by default, valid without a bucket
    bad: list[tuple[dict[str, Any], str]] = [
        ({"enabled": True}, "object.bucket is required"),
        ({"preset": "gcs"}, "object.preset"),
        ({"part_size_bytes": "4MiB"}, "object.part_size_bytes"),
        ({"retry_mode": "legacy"}, "object.retry_mode"),
        ({"addressing_style": "dns"}, "object.addressing_style"),
        ({"max_concurrency": 0}, "object.max_concurrency"),
        ({"total_timeout_s": 0.0}, "object.total_timeout_s"),
        ({"prefix": "a/../b"}, "object.prefix"),
        ({"endpoint_url": "minio:9000"}, "object.endpoint_url"),
        ({"enabled": True, "bucket": "Bad_Bucket"}, "object.bucket"),
        ({"enabled": True, "bucket": "ckpt", "preset": "oss"}, "object.region"),
        ({"conditional_put": "maybe"}, "object.conditional_put"),
        ({"hashed_prefixes": -1}, "object.hashed_prefixes"),
    ]
    for flags, message in bad:
        with pytest.raises(InvalidArgument, match=message.replace(".", r"\.")):
            config.load(None, env={}, flags={"object": flags})
    with pytest.raises(InvalidArgument, match="unknown config key object.secret_key"):
        config.load(None, env={}, flags={"object": {"secret_key": "x"}})


def test_manifest_object_key_is_optional_and_backward_compatible() -> None:
    plain = manifest_of(JOB, 1, [shard_entry(0, b"abc")])
    assert b"object_key" not in plain.to_json()  # bytes of manifests without it are unchanged
    assert Manifest.from_json(plain.to_json()) == plain
    keyed = dataclasses.replace(plain, shards=(dataclasses.replace(
        plain.shards[0], object_key="p/_shards/0001/llama-7b/step-000000000001/rank-000000.shard"),))
    assert Manifest.from_json(keyed.to_json()) == keyed
    obj = json.loads(keyed.to_json())
    obj["shards"][0]["object_key"] = "p/llama-7b/step-000000000001/rank-000001.shard"  # another rank's
    with pytest.raises(ValueError, match="invalid object_key"):
        Manifest.from_json(json.dumps(obj))


def test_debug_logging_never_shows_credentials(make_tier: TierFactory) -> None:
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage() + repr(record.args))

    root = logging.getLogger()
    handler = Capture(logging.DEBUG)
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in ("botocore", "urllib3"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # as if nobody had pinned them
    try:
        tier = make_tier()
        save_step(tier, JOB, 14, [pattern(6 * MiB, 1)])
        assert read_back(tier, JOB, 14, 0) == pattern(6 * MiB, 1)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = "\n".join(records)
    assert records  # ckptd's own debug lines do get through
    for secret in ("Authorization", "AWS4-HMAC-SHA256", "Signature=", SECRET_ACCESS_KEY, ACCESS_KEY_ID):
        assert secret not in text
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
