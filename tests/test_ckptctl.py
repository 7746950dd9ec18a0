"""ckptctl driven as a subprocess: against a running daemon and against a bare disk root.

Covers the JSON schemas of ``ls``/``show``/``status``/``restore``/``verify`` (checked by a small
schema matcher below, the same shapes docs/cli.md documents), bit-exact ``restore`` output that
loads with the safetensors library while ckptd is made unimportable, ``--dry-run`` plans, integrity
failures on flipped bytes (disk files and memory slots), the fixed exit codes (2 usage, 4 not
found, 5 integrity, 6 daemon unavailable, 130 interrupted), and the progress bar on a terminal
only.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ckptd_client import CheckpointManager, Level  # noqa: E402
from ckptd_client.tree import flatten  # noqa: E402

if TYPE_CHECKING:
    from conftest import DaemonProc

JOB = "llm-7b"
STEPS = (10, 20)
WORLD = 2
CTL = [sys.executable, "-m", "ckptd_client.ckptctl"]


# -- helpers -------------------------------------------------------------------------------
def ctl(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
        stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    full["NO_COLOR"] = "1"
    full.update(env or {})
    return subprocess.run([*CTL, *args], stdout=subprocess.PIPE, stderr=stderr, text=True, env=full,
                          timeout=timeout)


def ctl_json(*args: str, env: dict[str, str] | None = None) -> Any:
    res = ctl(*args, "-o", "json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def make_state(step: int, rank: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step * 100 + rank)
    return {
        "model": {
            "embed.weight": torch.randn(96, 40, generator=g).to(torch.bfloat16),
            "layers": [{"w": torch.randn(40, 40, generator=g), "b": torch.randn(40, generator=g).half()}
                       for _ in range(2)],
        },
        "optim": {"step": torch.tensor(step, dtype=torch.int64), "lr": 3e-4,
                  "mask": torch.rand(33, generator=g) > 0.5},
        "fp8": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
        "hist": np.arange(rank, rank + 12, dtype=np.int16).reshape(3, 4),
        "bytes": torch.randint(0, 255, (17,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(1.5 + rank, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "meta": {"epoch": 3, "name": f"rank{rank}"},
    }


def expected_tensors(state: dict[str, Any]) -> dict[str, Any]:
    leaves, _, _, _ = flatten(state)
    return {leaf.name: torch.as_tensor(leaf.obj) for leaf in leaves}


def raw(t: Any) -> bytes:
    """The tensor's bytes, whatever its dtype (bfloat16 and float8 included)."""
    t = t.detach().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def flip_byte(path: Path, offset: int = 37) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@dataclass
class Saved:
    daemon: DaemonProc
    expected: dict[tuple[int, int], dict[str, Any]]  # (step, rank) -> tensor name -> tensor

    @property
    def data(self) -> Path:
        return self.daemon.root / "data"

    def shard(self, step: int, rank: int) -> Path:
        return self.data / JOB / f"step-{step:012d}" / f"rank-{rank:06d}.shard"

    def addr(self) -> list[str]:
        return ["--addr", self.daemon.addr]


@pytest.fixture
def saved(daemon: DaemonProc) -> Iterator[Saved]:
    managers = [CheckpointManager(JOB, rank=r, world_size=WORLD, addr=daemon.addr, on_error="raise")
                for r in range(WORLD)]
    expected: dict[tuple[int, int], dict[str, Any]] = {}
    try:
        for step in STEPS:
            handles = []
            for rank, mgr in enumerate(managers):
                state = make_state(step, rank)
                expected[(step, rank)] = expected_tensors(state)
                handles.append(mgr.save(step, state))
            for h in handles:
                assert h.ok, h.error
            handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=60)
    finally:
        for m in managers:
            m.close()
    yield Saved(daemon, expected)


# -- a small schema matcher ----------------------------------------------------------------
class MapOf:
    def __init__(self, key: Any, value: Any) -> None:
        self.key, self.value = key, value


class Nullable:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


INT = "int"  # a real int, not a bool


def conforms(value: Any, spec: Any, path: str = "$") -> None:
    """Assert value matches spec: a type, INT, a set of allowed values, [item spec], a dict of
    exact keys ("?key" marks an optional one), MapOf, Nullable, or a predicate."""
    if isinstance(spec, Nullable):
        if value is not None:
            conforms(value, spec.spec, path)
    elif spec == INT:
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: {value!r} is not an int"
    elif isinstance(spec, type):
        if spec is float:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: {value!r}"
        else:
            assert isinstance(value, spec) and not (spec is int and isinstance(value, bool)), \
                f"{path}: {value!r} is not {spec.__name__}"
    elif isinstance(spec, (set, frozenset)):
        assert value in spec, f"{path}: {value!r} not in {sorted(spec)}"
    elif isinstance(spec, list):
        assert isinstance(value, list), f"{path}: not a list"
        for i, item in enumerate(value):
            conforms(item, spec[0], f"{path}[{i}]")
    elif isinstance(spec, MapOf):
        assert isinstance(value, dict), f"{path}: not an object"
        for k, v in value.items():
            conforms(k, spec.key, f"{path}.<key>")
            conforms(v, spec.value, f"{path}.{k}")
    elif isinstance(spec, dict):
        assert isinstance(value, dict), f"{path}: not an object"
        required = {k for k in spec if not k.startswith("?")}
        allowed = {k.lstrip("?") for k in spec}
        assert required <= set(value), f"{path}: missing {sorted(required - set(value))}"
        assert set(value) <= allowed, f"{path}: unexpected {sorted(set(value) - allowed)}"
        for k, sub in spec.items():
            if k.lstrip("?") in value:
                conforms(value[k.lstrip("?")], sub, f"{path}.{k.lstrip('?')}")
    elif callable(spec):
        assert spec(value), f"{path}: {value!r} rejected"
    else:
        raise AssertionError(f"bad spec at {path}: {spec!r}")


TIERS = {"memory", "disk", "peer", "object"}
TIER_STATES = {"pending", "in_progress", "committed", "failed", "skipped", "removed", "uncommitted", "invalid"}
SOURCE = {"kind": {"daemon", "disk"}, "?address": str, "?root": str}
LS_SCHEMA = {
    "schema": {"ckptctl.ls/v1"}, "source": SOURCE, "jobs": [str],
    "steps": [{"job": str, "step": INT, "world_size": INT, "nbytes": INT, "committed": bool,
               "tiers": MapOf(TIERS, TIER_STATES), "pinned": bool}],
}
TENSOR = {"name": str, "dtype": str, "shape": [INT], "offset": INT, "nbytes": INT}
SHOW_SCHEMA = {
    "schema": {"ckptctl.show/v1"}, "source": SOURCE, "job": str, "step": INT, "world_size": INT, "nbytes": INT,
    "created_unix_s": float, "tiers": [TIERS], "extra": dict,
    "shards": [{"rank": INT, "key": str, "nbytes": INT, "tensor_count": INT, "chunk_bytes": INT, "chunks": INT,
                "chunk_crc32c": [INT], "crc32c_digest": lambda s: isinstance(s, str) and len(s) == 8,
                "locations": [{"tier": TIERS, "location": str}], "?tensors": [TENSOR]}],
}
PLAN_SCHEMA = {
    "schema": {"ckptctl.restore-plan/v1"}, "source": SOURCE, "job": str, "step": INT, "world_size": INT,
    "tiers": [TIERS], "shards": [{"rank": INT, "nbytes": INT, "plan": [{"tier": TIERS, "detail": str}]}],
}
RESTORE_SCHEMA = {
    "schema": {"ckptctl.restore/v1"}, "source": SOURCE, "job": str, "step": INT, "world_size": INT,
    "format": {"safetensors", "torch"}, "dir": str, "manifest": str, "nbytes": INT, "seconds": float,
    "files": [{"rank": INT, "path": str, "file_bytes": INT, "shard_bytes": INT, "tensors": INT,
               "served_from": TIERS, "source": str, "seconds": float, "rejected": [str]}],
}
VERIFY_SCHEMA = {
    "schema": {"ckptctl.verify/v1"}, "source": SOURCE, "job": str, "step": Nullable(INT), "read_data": bool,
    "ok": bool, "nbytes_read": INT, "bad_copies": [str],
    "checks": [{"tier": TIERS, "rank": Nullable(INT), "location": str,
                "status": {"ok", "bad", "missing", "absent", "error"}, "detail": str, "nbytes_read": INT}],
}
STATUS_SCHEMA = {
    "schema": {"ckptctl.status/v1"}, "source": SOURCE,
    "daemon": Nullable({"version": str, "address": str, "root": str, "shm_dir": str, "draining": bool,
                        "tiers": [TIERS]}),
    "memory": Nullable({"budget_bytes": INT, "bytes_in_use": INT, "slots": INT}),
    "disk": Nullable({"root": str, "?total_bytes": INT, "?used_bytes": INT, "?free_bytes": INT,
                      "checkpoint_bytes": INT}),
    "peers": list,
    "jobs": [{"job": str, "steps": INT, "latest": MapOf(TIERS, Nullable(INT)),
              "in_flight": {"staging": INT, "disk": INT}}],
}


# -- inspecting ----------------------------------------------------------------------------
def test_version(saved: Saved) -> None:
    doc = ctl_json("version", *saved.addr())
    conforms(doc, {"schema": {"ckptctl.version/v1"}, "client": str, "python": str,
                   "daemon": Nullable({"version": str, "address": str})})
    assert doc["daemon"]["address"] == f"unix:{saved.daemon.addr}"
    assert ctl("--version").stdout.startswith("ckptctl ")
    # no daemon is not an error for `version`
    res = ctl("version", "--addr", "/nonexistent/ckptd.sock")
    assert res.returncode == 0 and "daemon  -" in res.stdout


def test_ls_show_status_json_against_daemon(saved: Saved) -> None:
    env = {"CKPTD_ADDR": saved.daemon.addr}  # the environment variable, not --addr
    ls = ctl_json("ls", env=env)
    conforms(ls, LS_SCHEMA)
    assert ls["jobs"] == [JOB]
    assert [s["step"] for s in ls["steps"]] == list(STEPS)
    for s in ls["steps"]:
        assert s["committed"] and s["world_size"] == WORLD
        assert s["tiers"]["disk"] == "committed"
    assert ls == ctl_json("ls", JOB, *saved.addr()) | {"source": ls["source"]}

    show = ctl_json("show", f"{JOB}@latest", "--tensors", *saved.addr())
    conforms(show, SHOW_SCHEMA)
    assert show["step"] == STEPS[-1] and show["world_size"] == WORLD
    assert set(show["tiers"]) == {"memory", "disk"}
    for shard in show["shards"]:
        exp = saved.expected[(show["step"], shard["rank"])]
        got = {t["name"]: t for t in shard["tensors"]}
        assert set(got) == set(exp)
        for name, t in exp.items():
            assert got[name]["dtype"] == str(t.dtype).removeprefix("torch.")
            assert got[name]["shape"] == list(t.shape)
        assert [loc["tier"] for loc in shard["locations"]] == ["memory", "disk"]
        assert shard["locations"][1]["location"] == str(saved.shard(show["step"], shard["rank"]))
        assert shard["chunks"] == len(shard["chunk_crc32c"]) >= 1
    show10 = ctl_json("show", f"{JOB}@10", *saved.addr())
    conforms(show10, SHOW_SCHEMA)
    assert show10["step"] == 10 and all("tensors" not in s for s in show10["shards"])
    assert ctl_json("show", JOB, *saved.addr())["step"] == STEPS[-1]  # bare JOB = latest

    status = ctl_json("status", *saved.addr())
    conforms(status, STATUS_SCHEMA)
    assert status["daemon"]["root"] == str(saved.daemon.root)
    assert status["jobs"][0]["latest"] == {"memory": 20, "disk": 20}
    assert status["disk"]["checkpoint_bytes"] == sum(s["nbytes"] for s in ls["steps"])


def test_json_against_bare_root(saved: Saved) -> None:
    daemon_ls = ctl_json("ls", *saved.addr())
    daemon_show = ctl_json("show", f"{JOB}@20", "--tensors", *saved.addr())
    assert saved.daemon.terminate() == 0
    for root in (saved.daemon.root, saved.data):  # a daemon root or its data/ directory
        ls = ctl_json("ls", "--root", str(root))
        conforms(ls, LS_SCHEMA)
        assert ls["source"] == {"kind": "disk", "root": str(saved.data)}
        assert [(s["step"], s["nbytes"], s["tiers"]) for s in ls["steps"]] == \
            [(s["step"], s["nbytes"], {"disk": "committed"}) for s in daemon_ls["steps"]]
    show = ctl_json("--root", str(saved.daemon.root), "show", f"{JOB}@20", "--tensors")
    conforms(show, SHOW_SCHEMA)
    assert show["tiers"] == ["disk"]
    for a, b in zip(show["shards"], daemon_show["shards"], strict=True):
        assert a["tensors"] == b["tensors"] and a["chunk_crc32c"] == b["chunk_crc32c"]
        assert a["locations"] == [{"tier": "disk", "location": str(saved.shard(20, a["rank"]))}]
    status = ctl_json("status", "--root", str(saved.data))
    conforms(status, STATUS_SCHEMA)
    assert status["daemon"] is None and status["jobs"][0]["latest"] == {"disk": 20}
    # an uncommitted step directory shows up as such
    (saved.data / JOB / "step-000000000030").mkdir()
    ls = ctl_json("ls", JOB, "--root", str(saved.data))
    conforms(ls, LS_SCHEMA)
    assert ls["steps"][-1] == {"job": JOB, "step": 30, "world_size": 0, "nbytes": 0, "committed": False,
                               "tiers": {"disk": "uncommitted"}, "pinned": False}


def test_human_tables(saved: Saved) -> None:
    ls = ctl("ls", *saved.addr())
    assert ls.returncode == 0
    header, *rows = ls.stdout.splitlines()
    assert header.split() == ["JOB", "STEP", "WORLD", "SIZE", "MEMORY", "DISK", "COMMITTED"]
    assert [r.split()[:2] for r in rows] == [[JOB, "10"], [JOB, "20"]]
    show = ctl("show", f"{JOB}@20", "--tensors", *saved.addr())
    assert show.returncode == 0
    assert "model.embed.weight" in show.stdout and "bfloat16" in show.stdout and "[96,40]" in show.stdout
    assert str(saved.shard(20, 1)) in show.stdout
    status = ctl("status", *saved.addr())
    assert status.returncode == 0 and JOB in status.stdout and "memory" in status.stdout
    assert "\x1b[" not in ls.stdout + show.stdout + status.stdout


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


# -- verify --------------------------------------------------------------------------------
def test_verify_flipped_byte_on_bare_root(saved: Saved) -> None:
    doc = ctl_json("verify", f"{JOB}@20", "--read-data", *saved.addr())
    conforms(doc, VERIFY_SCHEMA)
    assert doc["ok"] and {(c["tier"], c["status"]) for c in doc["checks"]} == {("memory", "ok"), ("disk", "ok")}
    assert doc["nbytes_read"] > 0
    assert saved.daemon.terminate() == 0
    root = ["--root", str(saved.daemon.root)]
    assert ctl("verify", f"{JOB}@20", "--read-data", *root).returncode == 0
    bad = saved.shard(20, 1)
    flip_byte(bad)
    res = ctl("verify", f"{JOB}@20", "--read-data", *root)
    assert res.returncode == 5
    assert str(bad) in res.stdout and str(bad) in res.stderr and "crc32c mismatch" in res.stdout
    assert str(saved.shard(20, 0)) not in res.stderr
    res = ctl("verify", f"{JOB}@20", "--read-data", "-o", "json", *root)
    assert res.returncode == 5
    doc = json.loads(res.stdout)
    conforms(doc, VERIFY_SCHEMA)
    assert not doc["ok"] and doc["bad_copies"] == [str(bad)]
    # without --read-data only presence and sizes are checked
    assert ctl("verify", f"{JOB}@20", *root).returncode == 0
    # a truncated file is caught without reading data
    with open(saved.shard(20, 0), "r+b") as f:
        f.truncate(100)
    res = ctl("verify", f"{JOB}@20", *root)
    assert res.returncode == 5 and str(saved.shard(20, 0)) in res.stderr
    # restore refuses the bad copy
    assert ctl("restore", f"{JOB}@20", "--to", str(saved.daemon.root.parent / "bad-out"), *root).returncode == 5
    assert ctl("verify", f"{JOB}@10", "--read-data", *root).returncode == 0


def test_verify_flipped_bytes_through_daemon(saved: Saved) -> None:
    disk_copy = saved.shard(10, 0)
    flip_byte(disk_copy)
    res = ctl("verify", f"{JOB}@10", "--tier", "disk", "--read-data", *saved.addr())
    assert res.returncode == 5 and str(disk_copy) in res.stderr
    plan = ctl_json("restore", f"{JOB}@20", "--dry-run", "--rank", "1", *saved.addr())
    slot = Path(plan["shards"][0]["plan"][0]["detail"])
    assert plan["shards"][0]["plan"][0]["tier"] == "memory"
    flip_byte(slot, offset=5)
    res = ctl("verify", f"{JOB}@20", "--tier", "memory", "--read-data", "-o", "json", *saved.addr())
    assert res.returncode == 5, res.stderr
    doc = json.loads(res.stdout)
    conforms(doc, VERIFY_SCHEMA)
    assert doc["bad_copies"] == [str(slot)]
    assert [c["status"] for c in doc["checks"]] == ["ok", "bad"]


# -- exit codes ----------------------------------------------------------------------------
def test_not_found_exits_4(saved: Saved, tmp_path: Path) -> None:
    for args in (["show", f"{JOB}@999"], ["show", "nojob@1"], ["ls", "nojob"], ["verify", f"{JOB}@15"],
                 ["restore", f"{JOB}@999", "--to", str(tmp_path / "o")], ["restore", f"{JOB}@999", "--dry-run"]):
        res = ctl(*args, *saved.addr())
        assert res.returncode == 4, (args, res.stderr)
        assert res.stdout == ""
    saved.daemon.terminate()
    root = ["--root", str(saved.daemon.root)]
    for args in (["show", f"{JOB}@999"], ["show", "nojob@latest"], ["ls", "nojob"], ["verify", f"{JOB}@15"]):
        assert ctl(*args, *root).returncode == 4, args
    assert ctl("ls", "--root", str(tmp_path / "no-such-dir")).returncode == 4


def test_no_daemon_exits_6(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    cases: list[tuple[list[str], dict[str, str]]] = [
        (["ls", "--addr", str(tmp_path / "missing.sock")], {}),
        (["status", "--addr", f"unix:{stale}"], {}),
        (["show", f"{JOB}@1"], {"CKPTD_ADDR": str(tmp_path / "env.sock")}),
        (["restore", f"{JOB}@1", "--to", str(tmp_path / "o")], {"CKPTD_DAEMON_ROOT": str(tmp_path)}),
    ]
    for args, env in cases:
        t0 = time.monotonic()
        res = ctl(*args, env=env)
        assert res.returncode == 6, (args, res.stderr)
        assert "no ckptd daemon" in res.stderr and res.stdout == ""
        assert time.monotonic() - t0 < 10


def test_silent_listener_exits_6_after_short_timeout(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])  # accept, never speak HTTP/2
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        res = ctl("ls", "--addr", str(path))
        assert res.returncode == 6 and 2.5 < time.monotonic() - t0 < 15
        # and Ctrl-C while it waits: 130
        p = subprocess.Popen([*CTL, "ls", "--addr", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        time.sleep(1.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130, err
        assert "interrupted" in err
    finally:
        stop.set()
        th.join()
        for c in conns:
            c.close()
        srv.close()


def test_slow_daemon_exits_7(tmp_path: Path) -> None:
    from concurrent import futures

    import grpc

    from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
    from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc

    class Slow(pb_grpc.CheckpointServiceServicer):
        def ListJobs(self, request: Any, context: Any) -> Any:
            time.sleep(3)
            return pb.ListJobsResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CheckpointServiceServicer_to_server(Slow(), server)
    path = tmp_path / "slow.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        res = ctl("ls", "--addr", str(path), "--timeout", "0.5")
        assert res.returncode == 7, res.stderr
    finally:
        server.stop(0)


@pytest.mark.parametrize("ident", ["job@-3", "../x@1", "job@", "@1", "a@b@c", "job@1.5", "job@+3", "j/b@1",
                                   "job@latest2", "-job@1"])
def test_bad_identity_exits_2(ident: str, tmp_path: Path) -> None:
    # identities are checked before any connection: no daemon is needed for exit 2
    res = ctl("show", "--addr", str(tmp_path / "none.sock"), "--", ident)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("args", [[], ["bogus"], ["ls", "--bogus"], ["restore", "job@1"],
                                  ["--addr", "x.sock", "--root", "/tmp", "ls"], ["ls", "../x"],
                                  ["verify", "job@1", "--tier", "tape"], ["restore", "job@1", "--rank", "-1"],
                                  ["-o", "yaml", "ls"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    res = ctl(*args)
    assert res.returncode == 2, (args, res.stderr)
    assert res.stdout == ""


def test_memory_tier_needs_a_daemon(saved: Saved) -> None:
    saved.daemon.terminate()
    assert ctl("verify", f"{JOB}@20", "--tier", "memory", "--root", str(saved.data)).returncode == 2


# -- terminal behaviour --------------------------------------------------------------------
def run_on_pty(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ckptctl with stderr on a pseudo-terminal (stdout piped); return (rc, stdout, terminal text)."""
    master, slave = os.openpty()
    full = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    full.update(env or {})
    p = subprocess.Popen([*CTL, *args], stdout=subprocess.PIPE, stderr=slave, env=full)
    os.close(slave)
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, chunks), daemon=True)
    reader.start()
    out, _ = p.communicate(timeout=120)
    reader.join(10)
    os.close(master)
    return p.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def _drain(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO once the child closed the terminal
            return
        if not data:
            return
        chunks.append(data)


def test_progress_bar_only_on_a_terminal(saved: Saved, tmp_path: Path) -> None:
    rc, out, term = run_on_pty(["restore", f"{JOB}@20", "--to", str(tmp_path / "tty"), *saved.addr()])
    assert rc == 0, term
    assert f"restore {JOB}@20" in term and "100%" in term and "ETA" in term and "/s" in term and "\r" in term
    assert "ETA" not in out  # the bar is on stderr only
    piped = ctl("restore", f"{JOB}@20", "--to", str(tmp_path / "pipe"), *saved.addr())
    assert piped.returncode == 0 and "ETA" not in piped.stderr and "%" not in piped.stderr
    # never in JSON mode, never with --no-progress
    rc, out, term = run_on_pty(["restore", f"{JOB}@20", "--to", str(tmp_path / "json"), "-o", "json",
                                *saved.addr()])
    assert rc == 0 and "ETA" not in term and json.loads(out)["step"] == 20
    rc, _, term = run_on_pty(["restore", f"{JOB}@20", "--to", str(tmp_path / "np"), "--no-progress", *saved.addr()])
    assert rc == 0 and "ETA" not in term
    # verify --read-data draws one too
    rc, _, term = run_on_pty(["verify", f"{JOB}@20", "--read-data", *saved.addr()])
    assert rc == 0 and "ETA" in term and f"verify {JOB}@20" in term


def test_no_color_honoured(saved: Saved) -> None:
    master, slave = os.openpty()
    try:
        for env, styled in (({}, True), ({"NO_COLOR": "1"}, False)):
            full = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")} | env
            full["TERM"] = "xterm"
            p = subprocess.run([*CTL, "ls", *saved.addr()], stdout=slave, stderr=subprocess.PIPE, env=full,
                               timeout=60)
            assert p.returncode == 0
            data = os.read(master, 65536).decode()
            assert ("\x1b[" in data) is styled, data
    finally:
        os.close(slave)
        os.close(master)


def test_module_entry_point_and_console_script_agree(saved: Saved) -> None:
    script = Path(sys.executable).parent / "ckptctl"
    if not script.exists():
        pytest.skip("console script not installed")
    a = subprocess.run([str(script), "ls", "-o", "json", *saved.addr()], capture_output=True, text=True, timeout=60)
    assert a.returncode == 0
    assert json.loads(a.stdout) == ctl_json("ls", *saved.addr())

