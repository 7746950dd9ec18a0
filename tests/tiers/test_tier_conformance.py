"""The Tier protocol contract (ckptd/tiers/base.py), checked on each tier implementation directly.

Every test that takes the ``tier`` fixture is part of the contract and runs once per entry of
``TIER_CASES``. To add a tier, write a ``TierCase`` factory for it: the tier itself plus the few
hooks a test needs to damage or inspect what the tier stored (flip a byte, truncate, name the
copy, list what it stores). The disk cases run on a temporary directory; the object case runs
against the moto S3 server of ``_moto.py`` (started only when an object case runs), each test
under a fresh key prefix. Tests of one implementation's internals (disk layout, start-up
recovery, multipart, bucket layout) are in test_disk_tier.py and test_object_tier.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.errors import AlreadyExists, CkptdError, IntegrityError, NotFound
from ckptd.core.manifest import MANIFEST_NAME, ChunkRef, Manifest, ShardEntry
from ckptd.tiers.base import Tier
from ckptd.tiers.disk import DiskTier
from tests.tiers._moto import TierFactory
from tests.tiers._tier_kit import CHUNK, JOB, entry_for, payload, read, save_step


@dataclass
class TierCase:
    name: str
    tier: Tier
    flip_byte: Callable[[str, int, ShardEntry, int], None]  # (job, step, entry, offset)
    truncate: Callable[[str, int, ShardEntry, int], None]  # (job, step, entry, new size)
    remove_shard: Callable[[str, int, ShardEntry], None]
    copy_name: Callable[[str, int, ShardEntry], str]  # what an IntegrityError must name
    corrupt_manifest: Callable[[str, int, bytes], None]
    stored: Callable[[], list[str]]  # every name the tier holds (files, object keys), sorted
    #: the manifest read_manifest returns after commit(m): m itself, or m with the location the
    #: tier recorded for each shard (the object tier names each shard's key in its manifest)
    as_committed: Callable[[Manifest], Manifest] = lambda m: m


def disk_case(root: Path, direct_io: bool) -> TierCase:
    tier = DiskTier(root, direct_io=direct_io, block_bytes=8192)  # small blocks: many writes per shard

    def path(job: str, step: int, entry: ShardEntry) -> Path:
        return tier.shard_path(job, step, entry)

    def flip(job: str, step: int, entry: ShardEntry, offset: int) -> None:
        with open(path(job, step, entry), "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0x01]))

    def truncate(job: str, step: int, entry: ShardEntry, size: int) -> None:
        os.truncate(path(job, step, entry), size)

    def corrupt_manifest(job: str, step: int, data: bytes) -> None:
        (tier.step_dir(job, step) / MANIFEST_NAME).write_bytes(data)

    return TierCase(
        name="disk", tier=tier, flip_byte=flip, truncate=truncate,
        remove_shard=lambda job, step, entry: path(job, step, entry).unlink(),
        copy_name=lambda job, step, entry: str(path(job, step, entry)),
        corrupt_manifest=corrupt_manifest,
        stored=lambda: sorted(str(p) for p in root.rglob("*")),
    )


def object_case(make_tier: TierFactory) -> TierCase:
    """The object tier stores one object per chunk (tiny random chunks: stored raw)."""
    tier = make_tier()
    client: Any = tier.client

    def chunk_key(job: str, step: int, entry: ShardEntry, offset: int) -> str:
        last = max(0, (entry.nbytes - 1) // entry.chunk_bytes)
        return tier.chunk_object_key(job, step, entry.rank, min(offset // entry.chunk_bytes, last))

    def name(job: str, step: int, entry: ShardEntry) -> str:  # every chunk key of the shard starts so
        return chunk_key(job, step, entry, 0).rsplit(".", 1)[0]

    def get(k: str) -> bytes:
        body: bytes = client.get_object(Bucket=tier.bucket, Key=k)["Body"].read()
        return body

    def flip(job: str, step: int, entry: ShardEntry, offset: int) -> None:
        k = chunk_key(job, step, entry, offset)
        data = bytearray(get(k))
        data[offset % entry.chunk_bytes] ^= 0x01
        client.put_object(Bucket=tier.bucket, Key=k, Body=bytes(data))

    def truncate(job: str, step: int, entry: ShardEntry, size: int) -> None:
        """The shard as if cut (or extended with zeros) to size: the chunk holding byte size shortened."""
        k = chunk_key(job, step, entry, size)
        data = get(k)
        cb = entry.chunk_bytes
        body = data[: size - min(size // cb, (entry.nbytes - 1) // cb) * cb].ljust(size - (entry.nbytes - len(data)),
                                                                                  b"\x00")
        client.put_object(Bucket=tier.bucket, Key=k, Body=body if size < entry.nbytes else data + b"\x00")

    def remove(job: str, step: int, entry: ShardEntry) -> None:
        client.delete_object(Bucket=tier.bucket, Key=chunk_key(job, step, entry, 0))

    def corrupt_manifest(job: str, step: int, data: bytes) -> None:
        client.put_object(Bucket=tier.bucket, Key=tier.manifest_key(job, step), Body=data)

    def stored() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=tier.bucket, Prefix=tier.base)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def as_committed(m: Manifest) -> Manifest:
        """m with the chunk records of save_step's bytes: raw chunks at this step's keys."""
        shards = []
        for s in m.shards:
            data = bytes(payload(s.nbytes, seed=m.step * 1000 + s.rank))
            parts = [data[o : o + s.chunk_bytes] for o in range(0, s.nbytes, s.chunk_bytes)]
            refs = tuple(ChunkRef(tier.chunk_object_key(m.job, m.step, s.rank, i), "raw", len(p),
                                  hashlib.sha256(p).hexdigest()) for i, p in enumerate(parts))
            shards.append(dataclasses.replace(s, chunks=refs))
        return dataclasses.replace(m, shards=tuple(shards))

    return TierCase(
        name="object", tier=tier, flip_byte=flip, truncate=truncate, remove_shard=remove,
        copy_name=name, corrupt_manifest=corrupt_manifest, stored=stored, as_committed=as_committed,
    )


TIER_CASES: dict[str, Callable[[pytest.FixtureRequest, Path], TierCase]] = {
    "disk": lambda request, root: disk_case(root, direct_io=True),
    "disk-buffered": lambda request, root: disk_case(root, direct_io=False),
    "object": lambda request, root: object_case(request.getfixturevalue("make_tier")),  # moto S3
}


@pytest.fixture(params=sorted(TIER_CASES))
def tier_case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TierCase]:
    yield TIER_CASES[request.param](request, tmp_path / "tier")


@pytest.fixture
def tier(tier_case: TierCase) -> Tier:
    return tier_case.tier


# Sizes: several chunks with a short tail, exactly one chunk, tiny, and empty.
SIZES = [3 * CHUNK + 123, CHUNK, 7, 0]


# -- the contract ----------------------------------------------------------------------------------


def test_commit_then_list_and_read_exact_bytes(tier_case: TierCase) -> None:
    tier = tier_case.tier
    m, blobs = save_step(tier, JOB, 5, SIZES)
    assert tier.list_committed(JOB) == [5]
    assert JOB in tier.list_jobs()
    back = tier.read_manifest(JOB, 5)
    assert back == tier_case.as_committed(m)
    assert back.to_json() == tier_case.as_committed(m).to_json()
    for entry, blob in zip(back.shards, blobs):
        assert read(tier, JOB, 5, entry) == blob


def test_steps_are_listed_ascending_and_per_job(tier: Tier) -> None:
    for step in (30, 4, 100000000000):
        save_step(tier, JOB, step, [10])
    save_step(tier, "other-job", 7, [10])
    assert tier.list_committed(JOB) == [4, 30, 100000000000]
    assert tier.list_committed("other-job") == [7]
    assert tier.list_committed("no-such-job") == []
    assert sorted(tier.list_jobs()) == ["conf-job", "other-job"]


def test_without_a_manifest_a_step_does_not_exist(tier: Tier) -> None:
    save_step(tier, JOB, 1, [100, 200], commit=False)
    assert tier.list_committed(JOB) == []
    with pytest.raises(NotFound):
        tier.read_manifest(JOB, 1)
    save_step(tier, JOB, 2, [100, 200])
    assert tier.list_committed(JOB) == [2]


def test_commit_twice_is_already_exists(tier_case: TierCase) -> None:
    tier = tier_case.tier
    m, blobs = save_step(tier, JOB, 3, [100, 5000])
    with pytest.raises(AlreadyExists):
        tier.commit(m)
    other = Manifest(JOB, 3, 2, m.shards, created_unix_s=99.0, extra={"other": True})
    with pytest.raises(AlreadyExists):
        tier.commit(other)
    assert tier.read_manifest(JOB, 3) == tier_case.as_committed(m)  # the first commit stands
    assert read(tier, JOB, 3, m.shards[1]) == blobs[1]


def test_committed_shards_cannot_be_overwritten(tier: Tier) -> None:
    m, blobs = save_step(tier, JOB, 3, [100])
    with pytest.raises(AlreadyExists):
        tier.put_shard(JOB, 3, m.shards[0], payload(100, seed=42))
    assert read(tier, JOB, 3, m.shards[0]) == blobs[0]


def test_uncommitted_shard_can_be_rewritten(tier: Tier) -> None:
    """A failed write is rewritten, not retried: the second put_shard of a rank replaces the first."""
    first = payload(300, seed=1)
    tier.put_shard(JOB, 9, entry_for(0, first), first)
    second = payload(500, seed=2)
    entry = entry_for(0, second)
    tier.put_shard(JOB, 9, entry, second)
    tier.commit(Manifest(JOB, 9, 1, (entry,)))
    assert read(tier, JOB, 9, entry) == bytes(second)


def test_commit_refuses_missing_shards(tier: Tier) -> None:
    data = payload(100, seed=3)
    e0 = entry_for(0, data)
    tier.put_shard(JOB, 4, e0, data)
    e1 = entry_for(1, data)  # never put
    with pytest.raises(CkptdError):
        tier.commit(Manifest(JOB, 4, 2, (e0, e1)))
    assert tier.list_committed(JOB) == []


@pytest.mark.parametrize("source", ["unaligned", "bytes", "readonly-mmap-slice"])
def test_any_source_buffer_is_stored_exactly(tier: Tier, source: str) -> None:
    """put_shard takes any memoryview: not only page-aligned slots (O_DIRECT must fall back)."""
    n = 5 * CHUNK + 17
    blob = random.Random(7).randbytes(n)
    if source == "unaligned":
        src = memoryview(bytearray(b"\x00" + blob))[1:]
    elif source == "bytes":
        src = memoryview(blob)
    else:
        mm = mmap.mmap(-1, n + 4096 + 3)
        mm[4096 + 3 : 4096 + 3 + n] = blob
        src = memoryview(mm)[4096 + 3 : 4096 + 3 + n].toreadonly()
    entry = entry_for(0, src)
    tier.put_shard(JOB, 1, entry, src)
    tier.commit(Manifest(JOB, 1, 1, (entry,)))
    assert read(tier, JOB, 1, entry) == blob


def test_put_shard_checks_the_size(tier: Tier) -> None:
    data = payload(100, seed=4)
    entry = entry_for(0, data)
    with pytest.raises(ValueError):
        tier.put_shard(JOB, 1, entry, data[:99])


@pytest.mark.parametrize("offset", [0, CHUNK - 1, CHUNK, 3 * CHUNK + 122])
def test_flipped_byte_is_an_integrity_error_naming_the_copy(tier_case: TierCase, offset: int) -> None:
    tier = tier_case.tier
    m, blobs = save_step(tier, JOB, 6, [3 * CHUNK + 123, 50])
    entry = m.shards[0]
    tier_case.flip_byte(JOB, 6, entry, offset)
    with pytest.raises(IntegrityError) as info:
        read(tier, JOB, 6, entry)
    assert tier_case.copy_name(JOB, 6, entry) in str(info.value)
    assert f"chunk {offset // CHUNK}" in str(info.value)
    assert read(tier, JOB, 6, m.shards[1]) == blobs[1]  # the other rank's copy is still good


@pytest.mark.parametrize("new_size", [0, 1, 3 * CHUNK, 3 * CHUNK + 122])
def test_truncated_shard_is_an_integrity_error_naming_the_copy(tier_case: TierCase, new_size: int) -> None:
    tier = tier_case.tier
    m, _ = save_step(tier, JOB, 8, [3 * CHUNK + 123])
    tier_case.truncate(JOB, 8, m.shards[0], new_size)
    with pytest.raises(IntegrityError) as info:
        read(tier, JOB, 8, m.shards[0])
    assert tier_case.copy_name(JOB, 8, m.shards[0]) in str(info.value)


def test_longer_shard_is_an_integrity_error(tier_case: TierCase) -> None:
    tier = tier_case.tier
    m, _ = save_step(tier, JOB, 8, [100])
    tier_case.truncate(JOB, 8, m.shards[0], 101)  # extends with a zero byte
    with pytest.raises(IntegrityError):
        read(tier, JOB, 8, m.shards[0])


def test_missing_shard_is_reported(tier_case: TierCase) -> None:
    tier = tier_case.tier
    m, _ = save_step(tier, JOB, 8, [100])
    tier_case.remove_shard(JOB, 8, m.shards[0])
    with pytest.raises(CkptdError) as info:
        read(tier, JOB, 8, m.shards[0])
    assert tier_case.copy_name(JOB, 8, m.shards[0]) in str(info.value)


def test_read_against_wrong_checksums_is_rejected(tier: Tier) -> None:
    m, _ = save_step(tier, JOB, 2, [2 * CHUNK])
    entry = m.shards[0]
    lying = ShardEntry(entry.rank, entry.nbytes, entry.chunk_bytes,
                       (entry.chunk_crc32c[0], entry.chunk_crc32c[1] ^ 1), entry.tensors, entry.tree)
    with pytest.raises(IntegrityError, match="chunk 1"):
        read(tier, JOB, 2, lying)


@pytest.mark.parametrize("garbage", [b"", b"{not json", b'{"schema_version": 99}', b"\x00" * 10])
def test_corrupt_manifest_is_an_integrity_error(tier_case: TierCase, garbage: bytes) -> None:
    save_step(tier_case.tier, JOB, 2, [10])
    tier_case.corrupt_manifest(JOB, 2, garbage)
    with pytest.raises(IntegrityError):
        tier_case.tier.read_manifest(JOB, 2)


def test_manifest_of_another_step_is_rejected(tier_case: TierCase) -> None:
    tier = tier_case.tier
    save_step(tier, JOB, 2, [10])
    m3, _ = save_step(tier, JOB, 3, [10])
    tier_case.corrupt_manifest(JOB, 2, m3.to_json())
    with pytest.raises(IntegrityError, match="names"):
        tier.read_manifest(JOB, 2)


def test_delete(tier: Tier) -> None:
    m1, b1 = save_step(tier, JOB, 1, [100, 200])
    save_step(tier, JOB, 2, [100, 200])
    tier.delete(JOB, 2)
    assert tier.list_committed(JOB) == [1]
    with pytest.raises(NotFound):
        tier.read_manifest(JOB, 2)
    assert read(tier, JOB, 1, m1.shards[1]) == b1[1]  # other steps untouched
    tier.delete(JOB, 2)  # deleting twice is harmless
    tier.delete(JOB, 77)  # so is deleting a step that never existed
    assert tier.list_committed(JOB) == [1]
    save_step(tier, JOB, 2, [100, 200])  # and the step can be saved again
    assert tier.list_committed(JOB) == [1, 2]


@pytest.mark.parametrize("job", ["..", "../escape", "a/b", "/abs", "", "x" * 200, "a..b", ".hidden"])
def test_bad_job_names_never_touch_the_store(tier_case: TierCase, tmp_path: Path, job: str) -> None:
    tier = tier_case.tier
    before = sorted(p for p in tmp_path.rglob("*")), tier_case.stored()
    data = payload(10, seed=0)
    entry = entry_for(0, data)
    with pytest.raises(ValueError):
        tier.put_shard(job, 1, entry, data)
    with pytest.raises(ValueError):
        tier.list_committed(job)
    with pytest.raises(ValueError):
        tier.read_manifest(job, 1)
    with pytest.raises(ValueError):
        tier.delete(job, 1)
    assert (sorted(p for p in tmp_path.rglob("*")), tier_case.stored()) == before
