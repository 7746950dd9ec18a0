"""Object tier under faults: a fault-injecting HTTP proxy (tests/tiers/faultproxy.py) in front of
the moto server.

- A few 503 SlowDown answers, connection resets, a reset mid-body and slow answers are ridden
  through by retries; the bytes read back exact.
- A create-only manifest put whose answer is lost is retried and recognised as our own commit.
- An endpoint down longer than the retry budget (attempts running out, or the deadline stopping
  retries): TierFailed within the bounded total time, no manifest, and cleanup_incomplete
  leaves no multipart upload behind.
- A slow store past total_timeout_s: TierFailed, and the multipart upload is aborted at once.
- A store that ignores If-None-Match: detected by the probe, commits go through a claim object.
- Presets as a recording forward proxy sees them: ``oss`` is virtual-hosted and sends no
  flexible-checksum headers, ``minio`` is path-style.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from botocore.config import Config as BotoConfig

from ckptd.core.errors import AlreadyExists, TierFailed
from tests.tiers._moto import (
    MiB,
    MotoS3,
    TierFactory,
    manifest_of,
    pattern,
    read_back,
    save_step,
    shard_entry,
    uploads_under,
)
from tests.tiers.faultproxy import FaultProxy, Request

JOB = "gpt-neo"


def test_retries_ride_through_503s_resets_and_slow_answers(make_tier: TierFactory, proxy: FaultProxy) -> None:
    tier = make_tier(endpoint_url=proxy.url, max_attempts=4, read_timeout_s=2.0)
    faults = [
        proxy.add("503", times=2, match=Request.is_chunk_put),
        proxy.add("reset", times=2, match=Request.is_chunk_put),
        proxy.add("reset_after_upstream", times=1, match=Request.is_chunk_put),
        proxy.add("slow", times=1, delay_s=0.5, match=Request.is_chunk_put),
        proxy.add("reset", times=1, match=lambda r: r.method == "PUT" and r.target.endswith("manifest.json")),
        proxy.add("503", times=1, match=lambda r: r.method == "HEAD"),
        proxy.add("reset_mid_body", times=2, match=Request.is_chunk_get),
        proxy.add("503", times=1, match=Request.is_chunk_get),
        proxy.add("slow", times=1, delay_s=3.0, match=Request.is_chunk_get),  # past read_timeout_s
    ]
    big, small = pattern(12 * MiB, 1), pattern(123_457, 2)
    save_step(tier, JOB, 1, [big, small], chunk_bytes=MiB)
    assert read_back(tier, JOB, 1, 0) == big
    assert read_back(tier, JOB, 1, 1) == small
    assert tier.list_committed(JOB) == [1]
    assert [f.hits for f in faults] == [f.times for f in faults]  # every fault did fire


def test_lost_answer_to_the_manifest_put_is_our_own_commit(make_tier: TierFactory, proxy: FaultProxy) -> None:
    tier = make_tier(endpoint_url=proxy.url)
    assert tier.conditional_put_supported()
    lost = proxy.add("reset_after_upstream", match=lambda r: r.method == "PUT" and r.target.endswith("manifest.json"))
    m = save_step(tier, JOB, 2, [pattern(5000, 1)])
    assert lost.hits == 1  # stored, answer lost, retried -> 412 -> the token says it was us
    assert tier.list_committed(JOB) == [2]
    with pytest.raises(AlreadyExists):
        tier.commit(m)


@pytest.mark.parametrize(("max_attempts", "total_s"), [(3, 30.0), (12, 2.0)],
                         ids=["attempts-run-out", "deadline-stops-retries"])
def test_endpoint_down_longer_than_the_retry_budget(
    make_tier: TierFactory, proxy: FaultProxy, s3_client: Any, max_attempts: int, total_s: float
) -> None:
    tier = make_tier(endpoint_url=proxy.url, max_attempts=max_attempts, connect_timeout_s=1.0, read_timeout_s=2.0,
                     total_timeout_s=total_s)
    assert tier.conditional_put_supported()  # probed while the store is up
    data = pattern(12 * MiB, 3)
    entry = shard_entry(0, data, chunk_bytes=MiB)
    # the store goes down at the first chunk PUT
    down = proxy.add("down", down_s=60.0, match=Request.is_chunk_put)
    started = time.monotonic()
    with pytest.raises(TierFailed, match="object tier: uploading gpt-neo@3 rank 0") as failed:
        tier.put_shard(JOB, 3, entry, memoryview(data))
    elapsed_s = time.monotonic() - started
    assert ("did not finish within" in str(failed.value)) == (total_s < 10), failed.value
    # the bound: total_timeout_s plus at most one attempt in flight (instant resets here); no retry
    # back-off is started that could end past the deadline. With 3 attempts the budget runs out
    # first: the chunk PUT's back-offs (each < 1 + 2 s).
    assert elapsed_s < (total_s if total_s < 10 else 6.0) + 1.5, elapsed_s
    assert down.hits == 1 and proxy.is_down()
    started = time.monotonic()
    with pytest.raises(TierFailed):
        tier.commit(manifest_of(JOB, 3, [entry]))
    assert time.monotonic() - started < min(total_s, 3.0) + 1.5
    proxy.up()
    assert tier.list_committed(JOB) == []
    # single PUTs leave no multipart upload behind; finished chunks are swept by gc
    assert uploads_under(s3_client, tier.bucket, tier.base) == []
    assert not tier.has_failed_uploads
    tier.sweep(JOB, older_than_s=0)
    assert s3_client.list_objects_v2(Bucket=tier.bucket, Prefix=tier.step_prefix(JOB, 3)).get("KeyCount") == 0
    # and the tier works again once the store is back
    save_step(tier, JOB, 4, [data], chunk_bytes=MiB)
    assert read_back(tier, JOB, 4, 0) == data


def test_upload_past_its_deadline_on_a_slow_store_is_aborted(
    make_tier: TierFactory, proxy: FaultProxy, s3_client: Any
) -> None:
    tier = make_tier(endpoint_url=proxy.url, total_timeout_s=1.5, read_timeout_s=5.0, max_concurrency=3)
    slow = proxy.add("slow", times=100, delay_s=2.5, match=Request.is_chunk_put)
    data = random.Random(9).randbytes(12 * MiB)  # twelve different chunks: no deduplication
    started = time.monotonic()
    with pytest.raises(TierFailed, match="did not finish within 1.5s"):
        tier.put_shard(JOB, 9, shard_entry(0, data, chunk_bytes=MiB), memoryview(data))
    assert time.monotonic() - started < 1.5 + 2.5 + 1.5  # the PUTs in flight finish, nothing new starts
    assert slow.hits == 3  # one per pool thread
    assert tier.list_committed(JOB) == []
    tier.sweep(JOB, older_than_s=0)  # what the PUTs in flight stored is garbage: gc removes it
    assert s3_client.list_objects_v2(Bucket=tier.bucket, Prefix=tier.base).get("KeyCount") == 0


def test_store_without_conditional_put_uses_a_claim(
    make_tier: TierFactory, proxy: FaultProxy, s3_client: Any
) -> None:
    proxy.strip_headers.add("if-none-match")  # the store silently ignores the condition
    tier = make_tier(endpoint_url=proxy.url)
    assert not tier.probe_conditional_put()
    m = save_step(tier, JOB, 5, [pattern(7000, 1)])
    assert tier.list_committed(JOB) == [5]
    assert not tier.conditional_put_supported()
    claim_puts = proxy.requests(lambda r: r.method == "PUT" and r.target.endswith("manifest.claim"))
    assert len(claim_puts) == 1
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=tier.bucket, Prefix=tier.base).get("Contents", ())]
    assert tier.claim_key(JOB, 5) not in keys  # dropped after the commit
    with pytest.raises(AlreadyExists):
        tier.commit(m)
    # a live claim by another writer blocks the step
    s3_client.put_object(Bucket=tier.bucket, Key=tier.claim_key(JOB, 6),
                         Body=b'{"token": "someone-else", "created_unix_s": %f}' % time.time())
    data = pattern(100, 2)
    tier.put_shard(JOB, 6, shard_entry(0, data), memoryview(data))
    with pytest.raises(AlreadyExists, match="another writer"):
        tier.commit(manifest_of(JOB, 6, [shard_entry(0, data)]))
    assert read_back(tier, JOB, 5, 0) == pattern(7000, 1)


def _has_checksum_header(r: Request) -> bool:
    return any(k.startswith("x-amz-checksum-") or k == "x-amz-sdk-checksum-algorithm" for k in r.headers)


def test_oss_preset_is_virtual_hosted_without_checksum_headers(
    make_tier: TierFactory, proxy: FaultProxy, moto_s3: MotoS3
) -> None:
    tier = make_tier(
        preset="oss", region="cn-test", endpoint_url="http://oss-cn-test.aliyuncs.com", conditional_put="on",
        client_config=BotoConfig(proxies={"http": proxy.url}),
    )
    big = pattern(11 * MiB, 4)
    save_step(tier, JOB, 7, [big, pattern(1000, 5)], chunk_bytes=MiB)
    assert read_back(tier, JOB, 7, 0) == big
    reqs = proxy.requests()
    host = f"{moto_s3.bucket}.oss-cn-test.aliyuncs.com"
    assert reqs and all(r.target.startswith(f"http://{host}/") and r.host == host for r in reqs)
    puts = [r for r in reqs if r.method == "PUT"]
    stored = {ref.object_key for s in tier.read_manifest(JOB, 7).shards for ref in s.chunks}
    assert sum(Request.is_chunk_put(r) for r in puts) == len(stored) >= 2  # equal chunks are stored once
    assert not [r for r in reqs if _has_checksum_header(r)]
    manifest_puts = [r for r in puts if r.target.endswith("/manifest.json")]
    assert len(manifest_puts) == 1
    assert manifest_puts[0].headers.get("x-oss-forbid-overwrite") == "true"
    assert "if-none-match" not in manifest_puts[0].headers


def test_minio_preset_is_path_style(make_tier: TierFactory, proxy: FaultProxy, moto_s3: MotoS3) -> None:
    tier = make_tier(preset="minio", endpoint_url="http://minio.test:9000",
                     client_config=BotoConfig(proxies={"http": proxy.url}))
    save_step(tier, JOB, 8, [pattern(6 * MiB, 6)], chunk_bytes=MiB)
    assert read_back(tier, JOB, 8, 0) == pattern(6 * MiB, 6)
    reqs = proxy.requests()
    assert reqs and all(r.target.startswith(f"http://minio.test:9000/{moto_s3.bucket}") for r in reqs)
    assert all(r.host == "minio.test:9000" for r in reqs)
    manifest_put = [r for r in reqs if r.method == "PUT" and r.target.endswith("/manifest.json")]
    assert manifest_put[-1].headers.get("if-none-match") == "*"
    # the default (when_supported) does send flexible checksums: the oss check above is not vacuous
    assert any(_has_checksum_header(r) for r in reqs if r.method == "PUT")
