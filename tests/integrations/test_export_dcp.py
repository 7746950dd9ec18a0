"""``ckptctl export`` of a step saved through the DCP plugin: FSDP2 shards (and a column-sharded
DTensor) of 2 gloo ranks merged into full tensors named as in the model's ``state_dict``,
bit-identical to the saved global tensors; a step whose DCP metadata record is damaged fails with
exit 5 (integrity) and leaves no file behind.

The ranks run ``tests/_dcp_worker.py export2`` (the DCP tests' worker) against one daemon.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckptd_client import CheckpointManager, Level
from safetensors.numpy import load_file

from ckptd.ctl.main import main as ckptctl
from tests._ckptd_helpers import Daemon, running_daemon, unique_job
from tests.integration.test_dcp import run_phase


def test_fsdp2_step_exports_full_tensors_bit_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 4 KiB checksum chunks: an export can stream within a limit far below the model's size
    with running_daemon(tmp_path / "d", env={"CKPTD_MEMORY_CHUNK_BYTES": "4096"}) as d:
        _export_fsdp2(d, tmp_path, capsys)


def _export_fsdp2(d: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = unique_job("xdcp")
    run_phase(d, "export2", job, 2, tmp_path)
    want = load_file(tmp_path / "expected-export.safetensors")
    assert set(want) == {"0.weight", "0.bias", "2.weight", "2.bias", "big", "cols"}

    # 'cols' (Shard(1), 320 bytes) is not a row range: it is assembled in memory, 480 bytes with its
    # largest chunk, so a 256-byte limit refuses it (exit 2) before any file is written
    refused = tmp_path / "refused"
    refused.mkdir()
    assert ckptctl(["--addr", d.addr, "export", f"{job}@1", "--to", str(refused), "--memory-limit", "256"]) == 2
    assert "'cols' is sharded across more than its first dimension" in capsys.readouterr().err
    assert list(refused.iterdir()) == []

    out = tmp_path / "out"
    assert ckptctl(["--addr", d.addr, "--json", "export", f"{job}@1", "--to", str(out),
                    "--memory-limit", "4KiB"]) == 0
    got = load_file(out / "model.safetensors")
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert got[name].tobytes() == t.tobytes(), name
    state = json.loads((out / "ckptd_state.json").read_text())
    assert state["model_key"] == "model" and any(k.startswith("optim.") for k in state["dcp"])

    # from the disk tier by range, 8 KiB at most at once for a model of over 64 KiB
    streamed = tmp_path / "streamed"
    capsys.readouterr()
    assert ckptctl(["--root", str(d.root), "--json", "export", f"{job}@1", "--to", str(streamed),
                    "--memory-limit", "8KiB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["nbytes"] > 64 * 2**10 and 0 < report["peak_buffer_bytes"] <= 8 * 2**10, report
    assert set(report["served_from"].values()) == {"disk"}
    assert (streamed / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    # from the disk tier, as torch.save
    pt = tmp_path / "pt"
    assert ckptctl(["--root", str(d.root), "export", f"{job}@1", "--to", str(pt), "--format", "torch"]) == 0
    back = torch.load(pt / "pytorch_model.bin", weights_only=True)
    assert all(back[k].numpy().tobytes() == t.tobytes() for k, t in want.items())


def test_damaged_dcp_metadata_record_fails_with_integrity_exit_and_no_output(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "d") as d:
        _damaged(d, tmp_path)


def _damaged(d: Daemon, tmp_path: Path) -> None:
    job = unique_job("xdcpbad")
    record = json.dumps({"schema": "ckptd.dcp.metadata", "version": 1,
                         "keys": {"model.w": {"kind": "tensor", "dtype": "float32", "size": [4],
                                              "chunks": [{"offsets": [0], "sizes": [4]}]}},
                         "storage": [{"fqn": "model.w", "offset": [0], "index": None, "rank": 0, "key": "model.w@7"}],
                         "planner_data": {"model.w": ["model", "w"]}})
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr) as m:
        raw = {"dcp": {"model.w@0": torch.zeros(4)}}
        m.save(1, dict(raw, dcp_metadata="{damaged")).wait(Level.LOCAL_DURABLE, timeout_s=60)
        m.save(2, dict(raw, dcp_metadata=record)).wait(Level.LOCAL_DURABLE, timeout_s=60)  # names an absent chunk
    for step in (1, 2):
        out = tmp_path / f"bad{step}"
        out.mkdir()
        assert ckptctl(["--addr", d.addr, "export", f"{job}@{step}", "--to", str(out)]) == 5
        assert list(out.iterdir()) == []
