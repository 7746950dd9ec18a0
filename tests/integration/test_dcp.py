"""torch.distributed.checkpoint through ckptd: FSDP2, 2-D tensor parallel, resharding, strict restore.

One daemon; the ranks are processes with a gloo group on CPU (tests/_dcp_worker.py runs several
cases per launch). Saved by 2 (sync, async thread, async process), loaded by 4 (2→4), saved again
by 4 with the explicit opt-in (the accidental new world size refused), loaded by 2 (4→2) and by 1
(2→1): every global tensor bit-identical (sha256 per tensor). A DDP-style replicated state saved
by 2 ranks holds its bytes once on disk. Bad input (a newer schema, a corrupted metadata record)
gives a typed error and loses nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd_client import CheckpointManager, Level
from ckptd_client.dcp import CkptdStorageReader, DcpMetadataCorrupt, DcpSchemaTooNew
from ckptd_client.dcp.codec import decode, encode
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.manifest import Manifest
from ckptd.core.types import step_dirname
from tests._ckptd_helpers import PYTHON, REPO, Daemon, free_port, run_rank_processes, unique_job

WORKER = REPO / "tests" / "_dcp_worker.py"


def run_phase(d: Daemon, phase: str, job: str, world_size: int, out: Path) -> list[dict[str, Any]]:
    port = free_port()
    reports = run_rank_processes([[PYTHON, str(WORKER), phase, "--addr", d.addr, "--job", job, "--rank", str(r),
                                   "--world-size", str(world_size), "--port", str(port), "--out", str(out)]
                                  for r in range(world_size)], timeout_s=180)
    for rank, report in enumerate(reports):
        assert report["errors"] == [], f"{phase} rank {rank}: {report['errors']}"
    assert d.alive(), d.log()
    return reports


def shard_sizes(d: Daemon, job: str, step: int) -> dict[int, int]:
    step_dir = d.data_dir / job / step_dirname(step)
    m = Manifest.from_json((step_dir / "manifest.json").read_bytes())
    return {s.rank: (step_dir / s.key).stat().st_size for s in m.shards}


def test_fsdp2_and_tensor_parallel_save_reshard_and_resume(mod_daemon: Daemon, tmp_path: Path) -> None:
    job = unique_job("dcp")
    saved = run_phase(mod_daemon, "save2", job, 2, tmp_path)
    assert all("fsdp2-saved-sync-thread-process" in r["checks"] for r in saved)

    # DDP-style replicated state (4096 float32 + 1024 float64 = 24576 bytes) by 2 ranks: stored once
    # (DCP's planner spreads the replicated tensors over the ranks, each written by one of them)
    for step in (1, 2):  # dcp.save, and dcp.async_save (staged into the slot, then packed)
        sizes = shard_sizes(mod_daemon, f"{job}-rep", step)
        assert 24576 <= sum(sizes.values()) < 24576 + 4096, sizes
        step_dir = mod_daemon.data_dir / f"{job}-rep" / step_dirname(step)
        names = [t.name for s in Manifest.from_json((step_dir / "manifest.json").read_bytes()).shards
                 for t in s.tensors]
        assert sorted(names) == ["dcp.b@0", "dcp.w@0"], names  # each replicated tensor held by one shard only

    loaded4 = run_phase(mod_daemon, "load4", job, 4, tmp_path)
    for r in loaded4:
        for check in ("reshard-2-to-4", "param-identity-kept", "new-world-size-refused-without-opt-in",
                      "training-continues", "tp-2d-round-trip", "strict-missing-key-named",
                      "strict-dtype-named", "dtensor-identity-kept"):
            assert check in r["checks"], (check, r)
    # each rank copied only the tensor slices it holds now: together one copy of the sharded tensors
    # (plus the replicated step counters each rank takes), not the step once per rank
    m3 = Manifest.from_json((mod_daemon.data_dir / job / step_dirname(3) / "manifest.json").read_bytes())
    tensor_bytes_saved = sum(t.nbytes for s in m3.shards for t in s.tensors if t.dtype != "uint8")
    read = sum(sum(r["bytes_read"].values()) for r in loaded4)
    assert tensor_bytes_saved <= read <= tensor_bytes_saved + 4 * 64, (read, tensor_bytes_saved)

    loaded2 = run_phase(mod_daemon, "load2", job, 2, tmp_path)
    assert all({"reshard-4-to-2", "tp-2d-reshard-4-to-2"} <= set(r["checks"]) for r in loaded2)
    loaded1 = run_phase(mod_daemon, "load1", job, 1, tmp_path)
    assert {"reshard-2-to-1-step1", "reshard-2-to-1-step3", "manager-dtensor-2-to-1",
            "manager-dtensor-values"} <= set(loaded1[0]["checks"])


def test_metadata_codec_round_trip_and_bad_records(mod_daemon: Daemon) -> None:
    job = unique_job("dcpmeta")
    state = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "n": 5, "s": {"k": [1, "a"]}}
    with CheckpointManager(job, rank=0, world_size=1, addr=mod_daemon.addr, on_error="raise") as m:
        from ckptd_client.dcp import CkptdStorageWriter

        writer = CkptdStorageWriter(manager=m, step=1)
        dcp_save(state, storage_writer=writer, no_dist=True)
        assert writer.handle is not None and writer.handle.ok
        reader = CkptdStorageReader(manager=m)
        md = reader.read_metadata()
        assert decode(encode(md)) == md  # the record round-trips, storage_data included
        doc = json.loads(encode(md))
        assert doc["keys"]["w"] == {"kind": "tensor", "dtype": "bfloat16", "size": [2, 3], "requires_grad": False,
                                    "chunks": [{"offsets": [0, 0], "sizes": [2, 3]}]}

        newer = dict(doc, version=99)
        with pytest.raises(DcpSchemaTooNew, match="version 99"):
            decode(json.dumps(newer))
        for bad, why in [("{not json", "not JSON"), (json.dumps(dict(doc, keys=[])), "'keys'"),
                         (json.dumps(dict(doc, schema="other")), "schema"),
                         (encode(md).replace('"bfloat16"', '"bfloat99"'), "unknown dtype"),
                         (encode(md).replace('"sizes":[2,3]', '"sizes":[3,3]'), "outside")]:
            with pytest.raises(DcpMetadataCorrupt, match=why):
                decode(bad)

        # steps whose stored record is newer or damaged: a typed error from dcp.load, nothing lost
        raw = {"dcp": {"w": torch.zeros(1)}}
        m.save(2, dict(raw, dcp_metadata=json.dumps(newer))).wait(Level.LOCAL_DURABLE, timeout_s=60)
        m.save(3, dict(raw, dcp_metadata="{damaged")).wait(Level.LOCAL_DURABLE, timeout_s=60)
        for step, err in ((2, "schema version 99"), (3, "not JSON")):
            target = {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "n": 0, "s": {"k": [0, ""]}}
            with pytest.raises(CheckpointException, match=err):  # DCP wraps the reader's typed error
                dcp_load(target, storage_reader=CkptdStorageReader(manager=m, step=step), no_dist=True)
            back: dict[str, Any] = {}
            assert m.restore(back, step=step) == step and torch.equal(back["dcp"]["w"], torch.zeros(1))
        target = {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "n": 0, "s": {"k": [0, ""]}}
        w = target["w"]
        dcp_load(target, storage_reader=CkptdStorageReader(manager=m, step=1), no_dist=True)
        assert target["w"] is w and torch.equal(w, state["w"]) and target["n"] == 5 and target["s"] == state["s"]


def test_async_save_falls_back_when_a_chunk_is_not_where_it_was_staged(mod_daemon: Daemon) -> None:
    """The staged slot cannot serve the plan (here: a chunk the stage did not record): the writer
    saves the ordinary way, copying out of the staged slot first, then aborts its lease."""
    from ckptd_client.dcp import CkptdStorageWriter
    from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save

    job = unique_job("dcpfall")
    state = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.arange(10), "n": 3}
    with CheckpointManager(job, rank=0, world_size=1, addr=mod_daemon.addr, on_error="raise") as m:
        writer = CkptdStorageWriter(manager=m, step=1)
        stage = writer.stage

        def stage_losing_b(sd: dict[str, Any]) -> dict[str, Any]:
            out = stage(sd)
            assert writer._staged is not None
            del writer._staged.entries["b"]
            return out

        writer.stage = stage_losing_b  # type: ignore[method-assign]
        dcp_async_save(state, storage_writer=writer, no_dist=True).result()
        assert writer.handle is not None and writer.handle.ok and writer._superseded is None
        writer.handle.wait(Level.LOCAL_DURABLE, timeout_s=60)
        def busy() -> int:
            return int(m.conn.call(m.conn.stub.DaemonStatus, pb.DaemonStatusRequest()).slots_busy)

        deadline = time.monotonic() + 20  # the drains end; an aborted lease holds nothing
        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert busy() == 0
        target = {"a": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.int64), "n": 0}
        dcp_load(target, storage_reader=CkptdStorageReader(manager=m, step=1), no_dist=True)
        assert torch.equal(target["a"], state["a"]) and torch.equal(target["b"], state["b"]) and target["n"] == 3
