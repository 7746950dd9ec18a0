"""A ranged restore from a peer fetches only the crc32c chunks covering its ranges.

Two daemons on loopback, 4 KiB chunks, a 64 KiB shard replicated from node a to node b; node a is
then lost and comes back empty, so the shard is only in b's memory (its replica). A ranged restore
on the fresh a is served from the peer bit-exact, and b's ``ckptd_peer_served_bytes_total`` grows
by the covering chunks alone. A chunk of b's replica damaged outside the ranges does not fail a
ranged restore (it is never sent); a range that needs it fails with the chunk named, and so does a
whole restore (no other copy is left).
"""

from __future__ import annotations

import mmap
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level
from prometheus_client.parser import text_string_to_metric_families

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from ckptd.core.integrity import covering_chunks
from ckptd.core.manifest import Manifest
from ckptd.core.types import step_dirname
from tests._ckptd_helpers import free_port, peer_nodes, unique_job
from tests.conftest import DaemonProc
from tests.integration.test_ranged_restore import CHUNK, ranged

TOKEN = "test-peer-token-ranged-0123456789"


def served_bytes(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "ckptd_peer_served_bytes":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no ckptd_peer_served_bytes_total in the metrics")


def damage_replica(shm_dir: Path, probe: bytes, probe_at: int, offset: int) -> None:
    """Flip byte ``offset`` of the replica in shm_dir, found by ``probe`` (its bytes at ``probe_at``)."""
    for path in sorted(p for p in shm_dir.rglob("*") if p.is_file() and p.stat().st_size):
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            at = m.find(probe)
            if at >= 0:
                m[at - probe_at + offset] ^= 0xFF
                return
    raise AssertionError(f"no replica in {shm_dir}")


def test_ranged_restore_from_a_peer_fetches_only_its_chunks(daemon_factory: Callable[..., DaemonProc]) -> None:
    port = free_port()
    chunk_env = {"CKPTD_MEMORY_CHUNK_BYTES": str(CHUNK)}
    nodes = peer_nodes(daemon_factory, ["a", "b"], TOKEN,
                       env={"a": chunk_env, "b": {**chunk_env, "CKPTD_METRICS_ADDRESS": f"127.0.0.1:{port}"}})
    a, b = nodes["a"], nodes["b"]
    job = unique_job("rangedpeer")
    data = np.arange(16384, dtype=np.float32)  # 64 KiB of tensor bytes
    with CheckpointManager(job, rank=0, world_size=1, addr=a.addr, on_error="raise") as m:
        h = m.save(1, {"x": data})
        h.wait(Level.LOCAL_DURABLE, timeout_s=60)
        h.wait(Level.REPLICATED, timeout_s=60)
    entry = Manifest.from_json((a.root / "data" / job / step_dirname(1) / "manifest.json").read_bytes()).shard(0)
    x, want = entry.tensors[0], data.tobytes()
    config = Path(a.args[a.args.index("--config") + 1]).read_text()
    a.kill()  # node a is lost; it comes back with nothing in memory or on disk
    a = daemon_factory(config_text=config, env=chunk_env)

    damage_replica(b.shm_dir, want[:64], x.offset, 10 * CHUNK + 7)  # chunk 10 of b's replica
    chan = grpc.insecure_channel(f"unix:{a.socket}")
    stub = pb_grpc.CheckpointServiceStub(chan)
    try:
        ranges = [(x.offset + 100, 5000), (x.offset + 9000, 16)]
        chunks = covering_chunks(ranges, CHUNK, entry.nbytes)
        assert 10 not in chunks
        before = served_bytes(port)
        resp, got = ranged(stub, job, ranges)
        assert resp.served_from == "peer"
        assert got[x.offset + 100:x.offset + 5100] == want[100:5100]
        assert got[x.offset + 9000:x.offset + 9016] == want[9000:9016]
        assert served_bytes(port) - before == len(chunks) * CHUNK < entry.nbytes  # the covering chunks alone

        before = served_bytes(port)
        with pytest.raises(grpc.RpcError) as bad:
            ranged(stub, job, [(10 * CHUNK + 4, 8)])  # needs chunk 10
        assert "crc32c mismatch in chunk 10" in str(bad.value.details())
        assert served_bytes(port) - before == CHUNK  # chunk 10 alone was sent, and refused
        with pytest.raises(grpc.RpcError) as whole:
            stub.PrepareRestore(pb.PrepareRestoreRequest(job=job, rank=0, world_size=1, step=1), timeout=30)
        assert "crc32c" in str(whole.value.details())
    finally:
        chan.close()
