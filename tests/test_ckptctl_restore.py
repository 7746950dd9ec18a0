"""ckptctl ``restore`` driven as a subprocess: against a running daemon and against a bare disk root.

Protects bit-exact ``restore`` output: every rank's safetensors file loads with the safetensors
library while ckptd is made unimportable and holds exactly the saved tensors (dtype, shape, bytes;
bfloat16 and float8 included), the torch format and ``--rank`` too; an existing output directory
is refused without ``--force``; the JSON result matches the documented schema. ``--dry-run``
plans name a tier per shard (memory then disk through a daemon, disk from a bare root) and read
or write nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests._ckptctl_kit import (  # noqa: E402
    JOB,
    PLAN_SCHEMA,
    RESTORE_SCHEMA,
    WORLD,
    Saved,
    conforms,
    ctl,
    ctl_json,
)


def raw(t: Any) -> bytes:
    """The tensor's bytes, whatever its dtype (bfloat16 and float8 included)."""
    t = t.detach().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).numpy().tobytes()) if t.numel() else b""


# -- restore -------------------------------------------------------------------------------
LOADER = r"""
import hashlib, json, sys
sys.modules["ckptd"] = None          # prove the files load without ckptd
sys.modules["ckptd_client"] = None
from safetensors.torch import load_file
out = {}
for path in sys.argv[1:]:
    tensors = load_file(path)
    out[path] = {k: [str(v.dtype).removeprefix("torch."), list(v.shape),
                     hashlib.sha256(v.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()
                                    if v.numel() else b"").hexdigest()] for k, v in tensors.items()}
print(json.dumps(out))
"""


def check_restored(out: Path, saved: Saved, step: int, ranks: range | list[int]) -> None:
    paths = [str(out / f"rank-{r:06d}.safetensors") for r in ranks]
    res = subprocess.run([sys.executable, "-c", LOADER, *paths], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout)
    for rank, path in zip(ranks, paths):
        exp = saved.expected[(step, rank)]
        assert set(loaded[path]) == set(exp)
        for name, t in exp.items():
            assert loaded[path][name] == [str(t.dtype).removeprefix("torch."), list(t.shape),
                                          hashlib.sha256(raw(t)).hexdigest()], name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"] == JOB and manifest["step"] == step and manifest["world_size"] == WORLD


def test_restore_from_daemon_bit_exact(saved: Saved, tmp_path: Path) -> None:
    out = tmp_path / "export"
    res = ctl("restore", f"{JOB}@20", "--to", str(out), *saved.addr())
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # piped: no progress bar, no messages
    check_restored(out, saved, 20, range(WORLD))
    from safetensors.torch import load_file

    t = load_file(str(out / "rank-000001.safetensors"))
    assert torch.equal(t["model.embed.weight"], saved.expected[(20, 1)]["model.embed.weight"])
    # again: refused without --force, fine with it; JSON result
    assert ctl("restore", f"{JOB}@20", "--to", str(out), *saved.addr()).returncode == 1
    doc = ctl_json("restore", f"{JOB}@20", "--to", str(out), "--force", *saved.addr())
    conforms(doc, RESTORE_SCHEMA)
    assert [f["rank"] for f in doc["files"]] == [0, 1] and {f["served_from"] for f in doc["files"]} == {"memory"}
    # torch format, one rank
    doc = ctl_json("restore", f"{JOB}@10", "--to", str(tmp_path / "pt"), "--format", "torch", "--rank", "1",
                   *saved.addr())
    conforms(doc, RESTORE_SCHEMA)
    state = torch.load(tmp_path / "pt" / "rank-000001.pt", weights_only=True)
    exp = saved.expected[(10, 1)]
    assert set(state) == set(exp)
    for name, t in exp.items():
        assert state[name].dtype == t.dtype and raw(state[name]) == raw(t), name
    assert not (tmp_path / "pt" / "rank-000000.pt").exists()
    # --rank outside the world is a usage error
    assert ctl("restore", f"{JOB}@10", "--to", str(tmp_path / "x"), "--rank", "2", *saved.addr()).returncode == 2


def test_restore_from_bare_root(saved: Saved, tmp_path: Path) -> None:
    assert saved.daemon.terminate() == 0
    out = tmp_path / "from-root"
    res = ctl("restore", f"{JOB}@10", "--to", str(out), "--root", str(saved.daemon.root))
    assert res.returncode == 0, res.stderr
    check_restored(out, saved, 10, range(WORLD))
    doc = ctl_json("restore", f"{JOB}@latest", "--to", str(tmp_path / "latest"), "--root", str(saved.data))
    conforms(doc, RESTORE_SCHEMA)
    assert doc["step"] == 20 and {f["served_from"] for f in doc["files"]} == {"disk"}
    check_restored(tmp_path / "latest", saved, 20, range(WORLD))


def test_restore_dry_run_names_a_tier_per_shard(saved: Saved, tmp_path: Path) -> None:
    out = tmp_path / "never"
    plan = ctl_json("restore", f"{JOB}@20", "--dry-run", "--to", str(out), *saved.addr())
    conforms(plan, PLAN_SCHEMA)
    assert [s["rank"] for s in plan["shards"]] == list(range(WORLD))
    for s in plan["shards"]:
        assert [p["tier"] for p in s["plan"]] == ["memory", "disk"]
        assert s["plan"][1]["detail"] == str(saved.shard(20, s["rank"]))
    human = ctl("restore", f"{JOB}@20", "--dry-run", *saved.addr())
    assert human.returncode == 0 and "memory" in human.stdout and "disk" in human.stdout
    assert not out.exists()  # nothing read, nothing written
    saved.daemon.terminate()
    plan = ctl_json("restore", f"{JOB}@20", "--dry-run", "--rank", "1", "--root", str(saved.data))
    conforms(plan, PLAN_SCHEMA)
    assert plan["shards"] == [{"rank": 1, "nbytes": plan["shards"][0]["nbytes"],
                               "plan": [{"tier": "disk", "detail": str(saved.shard(20, 1))}]}]


# -- --format torch: the torch side runs in a child process ---------------------------------
#: ckptctl's main in a process that must not import torch (the converter child does).
NO_TORCH_PARENT = r"""
import sys
{block}
from ckptd.ctl.main import main
rc = main(sys.argv[1:])
assert "torch" not in sys.modules, "ckptctl imported torch"
sys.exit(rc)
"""
#: A finder that refuses torch in this process only (children are not affected).
PARENT_BLOCKER = r"""
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ModuleNotFoundError("No module named 'torch' (blocked)", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""
NO_TORCH_MESSAGE = "--format torch needs PyTorch installed; use --format safetensors"


def test_torch_format_is_written_by_a_child_and_keeps_what_safetensors_cannot(daemon: Any, tmp_path: Path) -> None:
    """complex128 and a tensor named ``__metadata__`` (refused by safetensors) come back bit-exact in
    the .pt file, written while ckptctl's own process never imports torch; without torch (in
    ckptctl's process, or only in the child's) the documented error, exit 1, and no file left."""
    from ckptd_client import CheckpointManager, Level

    from tests._ckptctl_kit import expected_tensors

    g = torch.Generator().manual_seed(7)
    state = {"__metadata__": torch.randn(3, 2, dtype=torch.complex128, generator=g),
             "w": torch.randn(5, 3, generator=g).to(torch.bfloat16), "flags": torch.tensor([True, False, True]),
             "empty": torch.empty(0, 4), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    with CheckpointManager("torchfmt", rank=0, world_size=1, addr=daemon.addr, on_error="raise") as m:
        m.save(3, state).wait(Level.LOCAL_DURABLE, timeout_s=60)
    exp = expected_tensors(state)
    args = ["restore", "torchfmt@3", "--addr", daemon.addr, "--no-progress"]

    refused = ctl("restore", "torchfmt@3", "--to", str(tmp_path / "st"), "--addr", daemon.addr)
    assert refused.returncode == 2 and "use --format torch" in refused.stderr

    out = tmp_path / "pt"
    res = subprocess.run([sys.executable, "-c", NO_TORCH_PARENT.format(block=""), *args, "--to", str(out),
                          "--format", "torch"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "rank-000000.pt"]  # no staging file left
    loaded = torch.load(out / "rank-000000.pt", weights_only=True)
    assert list(loaded) == list(exp)
    for name, t in exp.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape and raw(loaded[name]) == raw(t), name
    assert loaded["w"].untyped_storage().data_ptr() != loaded["flags"].untyped_storage().data_ptr()

    # torch missing in ckptctl's process: refused before anything is staged
    early = tmp_path / "early"
    res = subprocess.run([sys.executable, "-c", NO_TORCH_PARENT.format(block=PARENT_BLOCKER), *args, "--to",
                          str(early), "--format", "torch"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and NO_TORCH_MESSAGE in res.stderr, res.stderr
    assert list(early.iterdir()) == []
    # torch found but not importable in the child (a broken install): the same error, nothing left
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('this torch is broken')\n")
    late = tmp_path / "late"
    pythonpath = os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])
    res = ctl(*args[:2], "--to", str(late), "--format", "torch", *args[2:], env={"PYTHONPATH": pythonpath})
    assert res.returncode == 1 and NO_TORCH_MESSAGE in res.stderr, res.stderr
    assert list(late.iterdir()) == []
