"""``ckptctl export``: a 2-rank step of a Hugging Face model becomes a directory that ``safetensors``
and ``transformers.from_pretrained`` load with the model's names and outputs; large models stream
within a memory limit; a corrupt shard fails with exit 5 and leaves nothing behind.

The step is saved by two real ranks' CheckpointManagers (replicated DDP-style: both hold the same
model, their own optimizer state) in the state layout of ``CkptdCallback``
(``ckptd_client.integrations.hf.trainer_checkpoint``) into a real daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd_client import CheckpointManager, Level

from ckptd.core.types import shard_key, step_dirname
from ckptd.ctl.main import main as ckptctl
from tests._ckptd_helpers import PYTHON, REPO, Daemon, clean_env, running_daemon, unique_job

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str, Any]]:
    """A daemon holding step 3 of a 2-rank job with a tiny GPT-2 (trained 1 step) in it."""
    from ckptd_client.integrations.hf import trainer_checkpoint
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerState

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=128, bos_token_id=0,
                                      eos_token_id=0)).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    job = unique_job("export")
    with running_daemon(tmp_path_factory.mktemp("export")) as d:
        for rank in (0, 1):
            with CheckpointManager(job, rank=rank, world_size=2, addr=d.addr, gather_peers=False) as m:
                handle = m.save(3, trainer_checkpoint(model, opt, sched, TrainerState(global_step=3)))
                assert handle.ok, handle.error
                if rank == 1:
                    handle.wait(Level.LOCAL_DURABLE, timeout_s=60)
        yield d, job, model


def logits(model: Any) -> torch.Tensor:
    ids = torch.arange(16).reshape(1, 16) % 128
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_loads_with_safetensors_and_from_pretrained(exported: Any, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    d, job, model = exported
    out = tmp_path / "out"
    assert ckptctl(["--addr", d.addr, "--json", "export", f"{job}@3", "--to", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_key"] == "model" and report["served_from"] == {"0": "memory"}  # rank 0's copy only
    assert sorted(p.name for p in out.iterdir()) == ["ckptd_state.json", "config.json", "model.safetensors"]
    tensors = load_file(out / "model.safetensors")
    expected = model.state_dict()
    assert list(tensors) != [] and set(tensors) == set(expected)  # the model's own names
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    loaded = GPT2LMHeadModel.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(model))

    state = json.loads((out / "ckptd_state.json").read_text())
    assert [r["rank"] for r in state["ranks"]] == [0, 1]
    groups = state["ranks"][1]["state"]["optimizer"]["param_groups"]
    assert groups[0]["lr"] == 1e-3 and groups[0]["betas"] == [0.9, 0.999]
    assert json.loads(state["ranks"][0]["state"]["trainer_state"])["global_step"] == 3
    exp_avg = state["ranks"][0]["state"]["optimizer"]["state"]["0"]["exp_avg"]["tensor"]
    assert exp_avg["dtype"] == "float32"

    # Bad input: exit 2 with nothing written (no such key; a limit below one checksum chunk).
    assert ckptctl(["--addr", d.addr, "export", f"{job}@3", "--to", str(tmp_path / "k"), "--model-key", "nope"]) == 2
    assert ckptctl(["--root", str(d.root), "export", f"{job}@3", "--to", str(tmp_path / "m"),
                    "--memory-limit", "1MiB"]) == 2
    assert not (tmp_path / "k").exists() and list((tmp_path / "m").iterdir()) == []

    # Again into the same directory: refused without --force, nothing changed.
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert ckptctl(["--addr", d.addr, "export", f"{job}@3", "--to", str(out)]) == 1
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_sharded_safetensors_with_index_and_torch_format(exported: Any, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    d, job, model = exported
    out = tmp_path / "sharded"
    assert ckptctl(["--root", str(d.root), "export", f"{job}@latest", "--to", str(out),
                    "--max-shard-size", "40KiB", "--no-progress"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert torch.equal(logits(GPT2LMHeadModel.from_pretrained(out).eval()), logits(model))

    pt = tmp_path / "pt"
    assert ckptctl(["--root", str(d.root), "export", job, "--to", str(pt), "--format", "torch"]) == 0
    loaded = torch.load(pt / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


#: ckptctl's main with its peak RSS (VmHWM: ru_maxrss would carry the forking test's over exec)
def test_ranks_with_different_shapes_of_a_tensor_are_refused_until_placements_are_recorded() -> None:
    from ckptd.core.errors import InvalidArgument
    from ckptd.core.layout import TensorEntry
    from ckptd.ctl.consolidate import Piece, full_tensor

    a, b = Piece(0, TensorEntry("w", "float32", (4, 8), 0, 128)), Piece(1, TensorEntry("w", "float32", (4, 8), 0, 128))
    assert full_tensor("w", [a, b]) is a  # replicated: the lowest rank's copy
    with pytest.raises(InvalidArgument, match="'w'.*issue 16"):
        full_tensor("w", [a, Piece(1, TensorEntry("w", "float32", (2, 8), 0, 64))])


RSS_PROBE = ("import sys\nfrom ckptd.ctl.main import main\nrc = main(sys.argv[1:])\n"
             "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
             "print('maxrss_kib', hwm, file=sys.stderr)\nsys.exit(rc)\n")


def test_export_streams_a_model_larger_than_its_memory_limit(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory()
    job = unique_job("big")
    g = torch.Generator().manual_seed(5)
    # Lightning's checkpoint layout (the model under "state_dict"): 16 x 6 MiB = 96 MiB, in 16 MiB checksum chunks
    state = {"state_dict": {f"layer{i}.weight": torch.randn(6 * 2**20 // 4, generator=g).reshape(1536, 1024)
                            for i in range(16)}, "global_step": 1, "optimizer_states": [{"param_groups": []}]}
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, gather_peers=False) as m:
        m.save(1, state).wait(Level.LOCAL_DURABLE, timeout_s=120)
    out = tmp_path / "big"
    cmd = [PYTHON, "-c", RSS_PROBE, "--root", str(d.root), "--json", "export", f"{job}@1", "--to", str(out),
           "--memory-limit", "32MiB", "--max-shard-size", "40MiB"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["nbytes"] == 96 * 2**20 and report["served_from"] == {"0": "disk"}
    assert report["model_key"] == "state_dict"
    assert 0 < report["peak_buffer_bytes"] <= 32 * 2**20
    maxrss = int(res.stderr.split("maxrss_kib")[1].split()[0]) * 1024
    assert maxrss < 96 * 2**20, f"peak RSS {maxrss} bytes: the export did not stream"
    from safetensors.torch import load_file

    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(names.values())) == 3
    for f in sorted(set(names.values())):
        for k, t in load_file(out / f).items():
            assert torch.equal(t, state["state_dict"][k])

    # A flipped byte in the shard file: exit 5 (integrity), and no file of this run is left.
    shard = d.root / "data" / job / step_dirname(1) / shard_key(0)
    with open(shard, "r+b") as f:
        f.seek(70 * 2**20)
        byte = f.read(1)
        f.seek(70 * 2**20)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = tmp_path / "bad"
    assert ckptctl(["--root", str(d.root), "export", f"{job}@1", "--to", str(bad), "--memory-limit", "32MiB"]) == 5
    assert list(bad.iterdir()) == []
