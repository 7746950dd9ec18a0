"""The object tier inside real daemons: drain to a real S3 endpoint (moto over HTTP), the global
commit across two daemons standing for two nodes, restore on an empty node from the object store,
a store that throttles or is down, and a daemon SIGKILLed mid-upload."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd.core.errors import TierFailed
from ckptd.core.manifest import Manifest
from tests.conftest import DaemonProc
from tests.state_factory import vector_state
from tests.tiers._moto import MotoS3
from tests.tiers.faultproxy import FaultProxy

N = 300_000  # float32 elements per rank: ~1.2 MB, several crc chunks with a small chunk size


def _config(endpoint: str, bucket: str, prefix: str, **extra: Any) -> str:
    lines = ["[memory]", 'chunk_bytes = "256KiB"', "[object]", "enabled = true", 'preset = "minio"',
             f'endpoint_url = "{endpoint}"', 'region = "us-east-1"', f'bucket = "{bucket}"',
             f'prefix = "{prefix}"', 'part_size_bytes = "5MiB"', "max_to_keep = 2"]
    lines = [line for line in lines if line.partition(" = ")[0] not in extra]  # extra overrides
    lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower()}" for k, v in extra.items()]
    return "\n".join(lines).replace("'", '"') + "\n"


def _state(step: int, rank: int) -> dict[str, Any]:
    return vector_state(1000 * step + rank, N, step=step, tag=f"r{rank}")


def _check(got: dict[str, Any], step: int, rank: int) -> None:
    want = _state(step, rank)
    assert got["w"].tobytes() == want["w"].tobytes()
    assert got["step"] == step and got["tag"] == want["tag"]


def _empty() -> dict[str, Any]:
    return {"w": np.zeros(N, dtype=np.float32), "step": -1, "tag": ""}


@pytest.fixture
def prefix() -> str:
    return f"pipe-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def node(daemon_factory: Callable[..., DaemonProc], moto_s3: MotoS3,
         prefix: str) -> Iterator[Callable[..., DaemonProc]]:
    def start(endpoint: str | None = None, args: list[str] | None = None, env: dict[str, str] | None = None,
              root: Path | None = None, shm_dir: Path | None = None, **extra: Any) -> DaemonProc:
        text = _config(endpoint or moto_s3.endpoint_url, moto_s3.bucket, prefix, **extra)
        return daemon_factory(config_text=text, extra_args=args or [], env=env, root=root, shm_dir=shm_dir)
    yield start


def _manifest_in_bucket(s3: MotoS3, prefix: str, job: str, step: int) -> Manifest:
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"{prefix}/{job}/step-{step:012d}/manifest.json")["Body"]
    return Manifest.from_json(body.read())


def test_empty_node_restores_from_the_object_store(node: Callable[..., DaemonProc], moto_s3: MotoS3,
                                                    prefix: str) -> None:
    a = node()
    ms = [CheckpointManager("objjob", rank=r, world_size=2, addr=a.addr) for r in range(2)]
    for step in (1, 2, 3):
        for m in ms:
            assert m.save(step, _state(step, m.rank)).ok
    status = ms[0].handles[-1].wait(Level.PERSISTED, timeout_s=120)
    assert status.level == Level.PERSISTED
    for m in ms:
        m.close()
    manifest = _manifest_in_bucket(moto_s3, prefix, "objjob", 3)
    assert [s.rank for s in manifest.shards] == [0, 1] and manifest.node_ranks == ()
    a.kill()

    b = node()  # a fresh node: empty shm, empty disk, the same bucket
    assert not (b.root / "data" / "objjob").exists()
    served = []
    for rank in range(2):
        with CheckpointManager("objjob", rank=rank, world_size=2, addr=b.addr) as m:
            assert m.latest_step() == 3
            got = _empty()
            assert m.restore(got) == 3
            assert m.last_restore is not None
            served.append(m.last_restore.served_from)
            _check(got, 3, rank)
    assert served == ["object", "object"]  # no local tier served any shard
    # re-warmed in the background: the step is back in memory and drained to the new node's disk
    deadline = time.monotonic() + 60
    manifest_path = b.root / "data" / "objjob" / "step-000000000003" / "manifest.json"
    while not manifest_path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert manifest_path.exists()
    with CheckpointManager("objjob", rank=1, world_size=2, addr=b.addr) as m:
        got = _empty()
        assert m.restore(got) == 3 and m.last_restore is not None
        assert m.last_restore.served_from == "memory"
        _check(got, 3, 1)


def test_two_nodes_commit_one_global_manifest(node: Callable[..., DaemonProc], moto_s3: MotoS3,
                                              prefix: str) -> None:
    nodes = [node(), node()]
    ms = [CheckpointManager("two", rank=r, world_size=2, addr=nodes[r].addr, node_ranks=[r]) for r in range(2)]
    for step in (1, 2):
        for m in ms:
            assert m.save(step, _state(step, m.rank)).ok
    for m in ms:  # both nodes see the step PERSISTED: the coordinator wrote it, the other saw it
        assert m.handles[-1].wait(Level.PERSISTED, timeout_s=120).level == Level.PERSISTED
        m.close()
    manifest = _manifest_in_bucket(moto_s3, prefix, "two", 2)
    assert [s.rank for s in manifest.shards] == [0, 1]
    for n in nodes:
        n.kill()
    fresh = node()
    for rank in range(2):
        with CheckpointManager("two", rank=rank, world_size=2, addr=fresh.addr) as m:
            got = _empty()
            assert m.restore(got) == 2 and m.last_restore is not None
            assert m.last_restore.served_from == "object"
            _check(got, 2, rank)


def test_disk_tier_off_uploads_from_memory(node: Callable[..., DaemonProc]) -> None:
    d = node(args=["--no-disk"])
    with CheckpointManager("nodisk", rank=0, world_size=1, addr=d.addr) as m:
        h = m.save(5, _state(5, 0))
        assert h.wait(Level.PERSISTED, timeout_s=120).level == Level.PERSISTED


def test_throttling_store_delays_persistence_but_never_training(
        node: Callable[..., DaemonProc], moto_s3: MotoS3) -> None:
    proxy = FaultProxy(moto_s3.endpoint_url, bucket=moto_s3.bucket)
    try:
        d = node(endpoint=proxy.url, max_attempts=8)
        proxy.add("503", times=6)
        with CheckpointManager("slow", rank=0, world_size=1, addr=d.addr) as m:
            h = m.save(1, _state(1, 0))
            assert h.ok
            h.wait(Level.LOCAL_DURABLE, timeout_s=60)
            assert h.wait(Level.PERSISTED, timeout_s=120).level == Level.PERSISTED
        assert sum(1 for r in proxy.requests() if r.method != "GET") >= 6
    finally:
        proxy.close()


def test_store_down_degrades_the_level_and_keeps_everything_local(
        node: Callable[..., DaemonProc], moto_s3: MotoS3) -> None:
    proxy = FaultProxy(moto_s3.endpoint_url, bucket=moto_s3.bucket)
    try:
        proxy.down_for(3600)
        d = node(endpoint=proxy.url, max_attempts=2, total_timeout_s=3.0, connect_timeout_s=1.0,
                 read_timeout_s=1.0)
        with CheckpointManager("down", rank=0, world_size=1, addr=d.addr) as m:
            h = m.save(1, _state(1, 0))
            assert h.ok  # training was not blocked by the store
            h.wait(Level.LOCAL_DURABLE, timeout_s=60)
            with pytest.raises(TierFailed):
                h.wait(Level.PERSISTED, timeout_s=120)
            got = _empty()
            assert m.restore(got) == 1
            _check(got, 1, 0)
        assert d.alive()
    finally:
        proxy.close()


def test_daemon_killed_mid_upload_restarts_the_upload(node: Callable[..., DaemonProc], moto_s3: MotoS3,
                                                      prefix: str) -> None:
    a = node(env={"CKPTD_FAILPOINTS": "object.upload.after_shard=kill"})
    with CheckpointManager("kill", rank=0, world_size=1, addr=a.addr) as m:
        assert m.save(7, _state(7, 0)).ok
        a.proc.wait(60)  # the failpoint SIGKILLs the daemon after the shard object is uploaded
    assert a.proc.returncode == -9
    s3 = moto_s3.client()
    listed = s3.list_objects_v2(Bucket=moto_s3.bucket, Prefix=f"{prefix}/kill/").get("Contents", [])
    assert not any(o["Key"].endswith("manifest.json") for o in listed)  # never reported committed
    b = node(root=a.root, shm_dir=a.shm_dir)  # the same node restarts on its surviving state
    with CheckpointManager("kill", rank=0, world_size=1, addr=b.addr) as m:
        assert m._wait(7, Level.PERSISTED, 120).level == Level.PERSISTED
    uploads = s3.list_multipart_uploads(Bucket=moto_s3.bucket, Prefix=f"{prefix}/").get("Uploads", [])
    assert uploads == []
    b.kill()
    fresh = node()
    with CheckpointManager("kill", rank=0, world_size=1, addr=fresh.addr) as m:
        got = _empty()
        assert m.restore(got) == 7 and m.last_restore is not None
        assert m.last_restore.served_from == "object"
        _check(got, 7, 0)


def test_empty_node_restores_a_step_whose_chunks_belong_to_a_deleted_step(
        node: Callable[..., DaemonProc], moto_s3: MotoS3, prefix: str) -> None:
    """A frozen base (the same bytes at every step) is uploaded once; retention (max_to_keep = 1)
    deletes the step that stored it, and an empty node still restores the newest step exactly."""
    a = node(max_to_keep=1)

    def state(step: int) -> dict[str, Any]:
        return {"base": vector_state(7, N)["w"], "head": _state(step, 0)["w"][: N // 16], "step": step}

    with CheckpointManager("ftjob", rank=0, world_size=1, addr=a.addr) as m:
        for step in (1, 2, 3):
            assert m.save(step, state(step)).ok
            assert m.handles[-1].wait(Level.PERSISTED, timeout_s=120).level == Level.PERSISTED
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=moto_s3.bucket, Prefix=f"{prefix}/ftjob/")
            .get("Contents", [])]
    assert not [k for k in keys if k.endswith("step-000000000001/manifest.json")]  # retention removed step 1
    chunks = _manifest_in_bucket(moto_s3, prefix, "ftjob", 3).shards[0].chunks
    shared = {c.object_key for c in chunks if "/step-000000000001/" in c.object_key}
    assert len(shared) >= len(chunks) // 2 and shared <= set(keys)  # the base's chunks stayed
    a.kill()

    b = node(max_to_keep=1)
    with CheckpointManager("ftjob", rank=0, world_size=1, addr=b.addr) as m:
        got = {"base": np.zeros(N, np.float32), "head": np.zeros(N // 16, np.float32), "step": -1}
        assert m.restore(got) == 3 and m.last_restore is not None
        assert m.last_restore.served_from == "object"
        want = state(3)
        assert got["base"].tobytes() == want["base"].tobytes() and got["head"].tobytes() == want["head"].tobytes()
