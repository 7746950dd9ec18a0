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
