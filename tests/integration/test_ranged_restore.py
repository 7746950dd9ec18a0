"""A ranged restore (PrepareRestore/Restore with byte ranges) reads and verifies only the crc32c chunks
covering the ranges, from memory and from disk, and still refuses a damaged chunk it needs.

4 KiB chunks, a 64 KiB shard (16 chunks). From disk after a daemon restart: chunk 10 is damaged on
disk; ranges inside chunks 0-1 restore bit-exact (the damaged chunk is never read), a range that
touches chunk 10 is IntegrityError, and so is a whole restore. From memory: a ranged restore of
another rank's shard returns the bytes asked for, and the slot stays the one memory copy.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from ckptd.core.manifest import Manifest
from ckptd.core.types import step_dirname
from tests._ckptd_helpers import unique_job
from tests.conftest import DaemonProc
from tests.tiers._moto import MotoS3

CHUNK = 4096


def ranged(stub: pb_grpc.CheckpointServiceStub, job: str, ranges: list[tuple[int, int]],
           rank: int = 0, world_size: int = 1) -> tuple[pb.PrepareRestoreResponse, bytes]:
    """A ranged PrepareRestore; the slot's bytes as the client maps them; the lease released."""
    resp = stub.PrepareRestore(pb.PrepareRestoreRequest(
        job=job, rank=rank, world_size=world_size, step=1,
        ranges=[pb.ByteRange(offset=o, length=n) for o, n in ranges]), timeout=30)
    try:
        with open(resp.slot_path, "rb") as f:
            return resp, f.read(resp.nbytes)
    finally:
        stub.ReleaseRestore(pb.ReleaseRestoreRequest(lease_id=resp.lease_id), timeout=10)


def test_ranged_restore_reads_only_the_chunks_it_needs(daemon_factory: Callable[..., DaemonProc]) -> None:
    env = {"CKPTD_MEMORY_CHUNK_BYTES": str(CHUNK)}
    d = daemon_factory(env=env)
    job = unique_job("ranged")
    data = np.arange(16384, dtype=np.float32)  # 64 KiB: chunks 0..15
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, on_error="raise") as m:
        m.save(1, {"x": data}).wait(Level.LOCAL_DURABLE, timeout_s=60)
    chan = grpc.insecure_channel(f"unix:{d.socket}")
    stub = pb_grpc.CheckpointServiceStub(chan)
    step_dir = d.root / "data" / job / step_dirname(1)
    entry = Manifest.from_json((step_dir / "manifest.json").read_bytes()).shard(0)
    x = entry.tensors[0]
    want = data.tobytes()

    # from memory: the bytes asked for; the slot is still the memory copy (served again)
    resp, got = ranged(stub, job, [(x.offset + 100, 5000)])
    assert resp.served_from == "memory" and got[x.offset + 100:x.offset + 5100] == want[100:5100]
    assert ranged(stub, job, [(x.offset, 8)])[0].served_from == "memory"
    chan.close()

    d.kill()
    shard = step_dir / entry.key
    raw = bytearray(shard.read_bytes())
    raw[10 * CHUNK + 7] ^= 0xFF  # chunk 10 damaged on disk
    shard.write_bytes(bytes(raw))
    d2 = daemon_factory(root=d.root, env=env)
    chan = grpc.insecure_channel(f"unix:{d2.socket}")
    stub = pb_grpc.CheckpointServiceStub(chan)
    try:
        resp, got = ranged(stub, job, [(x.offset + 100, 5000), (x.offset + 9000, 16)])  # chunks 0, 1, 2
        assert resp.served_from == "disk"
        assert got[x.offset + 100:x.offset + 5100] == want[100:5100]
        assert got[x.offset + 9000:x.offset + 9016] == want[9000:9016]
        with pytest.raises(grpc.RpcError) as bad:
            ranged(stub, job, [(10 * CHUNK + 4, 8)])  # needs chunk 10
        assert "crc32c mismatch in chunk 10" in str(bad.value.details())
        with pytest.raises(grpc.RpcError) as whole:
            stub.PrepareRestore(pb.PrepareRestoreRequest(job=job, rank=0, world_size=1, step=1), timeout=30)
        assert whole.value.code() == grpc.StatusCode.DATA_LOSS or "crc32c" in str(whole.value.details())
        with pytest.raises(grpc.RpcError) as outside:
            ranged(stub, job, [(entry.nbytes - 4, 8)])
        assert "outside the shard" in str(outside.value.details())
    finally:
        chan.close()



def test_ranged_restore_from_the_object_store_fetches_only_its_chunks(
        daemon_factory: Callable[..., DaemonProc], moto_s3: MotoS3) -> None:
    """A node with an empty disk: the shard is in the bucket only. A chunk damaged in the bucket
    outside the ranges does not fail a ranged restore (never fetched); one inside does."""
    prefix = f"ranged-{uuid.uuid4().hex[:8]}"
    config = "\n".join(["[memory]", f"chunk_bytes = {CHUNK}", "[object]", "enabled = true", 'preset = "minio"',
                        f'endpoint_url = "{moto_s3.endpoint_url}"', 'region = "us-east-1"',
                        f'bucket = "{moto_s3.bucket}"', f'prefix = "{prefix}"', 'compression = "off"']) + "\n"
    job = unique_job("rangedobj")
    data = np.arange(16384, dtype=np.float32)
    a = daemon_factory(config_text=config)
    with CheckpointManager(job, rank=0, world_size=1, addr=a.addr, on_error="raise") as m:
        m.save(1, {"x": data}).wait(Level.PERSISTED, timeout_s=120)
    a.kill()
    s3 = moto_s3.client()
    mkey = f"{prefix}/{job}/{step_dirname(1)}/manifest.json"
    entry = Manifest.from_json(s3.get_object(Bucket=moto_s3.bucket, Key=mkey)["Body"].read()).shard(0)
    assert all(ref.codec == "raw" for ref in entry.chunks)  # one object per crc32c chunk, stored raw
    key = entry.chunks[12].object_key
    raw = bytearray(s3.get_object(Bucket=moto_s3.bucket, Key=key)["Body"].read())
    raw[3] ^= 0xFF  # chunk 12 damaged in the bucket
    s3.put_object(Bucket=moto_s3.bucket, Key=key, Body=bytes(raw))
    b = daemon_factory(config_text=config)  # a fresh node: nothing in memory or on disk
    chan = grpc.insecure_channel(f"unix:{b.socket}")
    stub = pb_grpc.CheckpointServiceStub(chan)
    try:
        x = entry.tensors[0]
        resp, got = ranged(stub, job, [(x.offset + 4, 4096)])  # chunks 0 and 1
        assert resp.served_from == "object" and got[x.offset + 4:x.offset + 4100] == data.tobytes()[4:4100]
        with pytest.raises(grpc.RpcError) as bad:
            ranged(stub, job, [(12 * CHUNK, 4)])
        assert "crc32c mismatch in chunk 12" in str(bad.value.details())
    finally:
        chan.close()
