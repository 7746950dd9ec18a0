"""Helpers shared by the ``ckptctl`` test modules (tests/test_ckptctl_*.py, not the admin ones).

``ctl``/``ctl_json`` run ckptctl as a subprocess with no ``CKPTD_*`` variable of the host and
``NO_COLOR`` set; ``save_steps`` (tests/conftest.py's ``saved`` fixture) saves two steps (10, 20)
of a two-rank job with a mix of dtypes (``torch_state``: bfloat16, float8, bool, int16, 0-d,
empty) into a fresh daemon and records the tensors each rank saved. The small schema matcher
``conforms`` and the ``*_SCHEMA`` documents are the JSON shapes of
``ls``/``show``/``status``/``restore``/``verify`` that docs/cli.md documents, held here as
executable checks: change both together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")  # every ckptctl test module imports this kit: all skip without torch

from ckptd_client import CheckpointManager, Level  # noqa: E402
from ckptd_client.tree import flatten  # noqa: E402

from tests.conftest import DaemonProc  # noqa: E402
from tests.state_factory import torch_state  # noqa: E402

JOB = "llm-7b"
STEPS = (10, 20)
WORLD = 2
CTL = [sys.executable, "-m", "ckptd.ctl.main"]


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


def expected_tensors(state: dict[str, Any]) -> dict[str, Any]:
    leaves, _, _, _ = flatten(state)
    return {leaf.name: torch.as_tensor(leaf.obj) for leaf in leaves}


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


def save_steps(daemon: DaemonProc) -> Saved:
    """Save STEPS of a WORLD-rank job into daemon; what tests/conftest.py's ``saved`` fixture holds."""
    managers = [CheckpointManager(JOB, rank=r, world_size=WORLD, addr=daemon.addr, on_error="raise")
                for r in range(WORLD)]
    expected: dict[tuple[int, int], dict[str, Any]] = {}
    try:
        for step in STEPS:
            handles = []
            for rank, mgr in enumerate(managers):
                state = torch_state(step, rank)
                expected[(step, rank)] = expected_tensors(state)
                handles.append(mgr.save(step, state))
            for h in handles:
                assert h.ok, h.error
            handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=60)
    finally:
        for m in managers:
            m.close()
    return Saved(daemon, expected)


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
    "storage": {"logical_bytes": INT, "stored_bytes": INT, "own_stored_bytes": INT, "compression_ratio": float,
                "dedup_shared_fraction": float},
    "shards": [{"rank": INT, "key": str, "nbytes": INT, "tensor_count": INT, "chunk_bytes": INT, "chunks": INT,
                "chunk_crc32c": [INT], "crc32c_digest": lambda s: isinstance(s, str) and len(s) == 8,
                "locations": [{"tier": TIERS, "location": str}], "stored_bytes": INT, "codecs": dict,
                "?tensors": [TENSOR]}],
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
