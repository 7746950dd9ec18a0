"""Import hygiene: the client stays light (no boto3, no daemon parts); the daemon never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import numpy as np

from tests._ckptd_helpers import clean_env
from tests.conftest import DaemonProc


def modules_after(code: str) -> set[str]:
    """sys.modules of a fresh interpreter after running code."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=clean_env())
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def offending(mods: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


CLIENT_FORBIDDEN = ("boto3", "botocore", "s3transfer", "aiofiles", "prometheus_client", "ckptd.tiers", "ckptd.daemon",
                    "ckptd.rpc", "ckptd.drains", "ckptd.restore", "ckptd.memory", "ckptd.peers", "ckptd.save",
                    "ckptd.ctl", "ckptd.core.metrics", "torch")


def test_client_import_is_light() -> None:
    mods = modules_after("import ckptd_client\nfrom ckptd_client import CheckpointManager, Level")
    assert "ckptd_client.manager" in mods  # the probe did import the client
    assert offending(mods, CLIENT_FORBIDDEN) == []


def test_client_save_path_modules_are_light() -> None:
    mods = modules_after("import ckptd_client.tree, ckptd_client.rpc, ckptd.core.layout")
    assert offending(mods, CLIENT_FORBIDDEN) == []


def test_daemon_modules_do_not_import_torch() -> None:
    mods = modules_after("import ckptd.daemon.wiring, ckptd.rpc.server, ckptd.daemon.cli, ckptd.drains.disk_drain, "
                         "ckptd.restore.planner, ckptd.tiers.disk, ckptd.rpc.convert")
    assert "ckptd.rpc.server" in mods and "ckptd.tiers.disk" in mods
    assert offending(mods, ("torch",)) == []


def test_running_daemon_has_not_loaded_torch(daemon_factory: Callable[..., DaemonProc]) -> None:
    """After serving a save and a restore, the daemon process has no torch library mapped."""
    from ckptd_client import CheckpointManager, Level

    d = daemon_factory()
    with CheckpointManager("imports-job", rank=0, world_size=1, addr=d.addr) as m:
        m.save(1, {"x": np.arange(10)}).wait(Level.LOCAL_DURABLE, timeout_s=60)
        out: dict[str, object] = {}
        assert m.restore(out) == 1
    maps = open(f"/proc/{d.proc.pid}/maps").read()
    assert "libtorch" not in maps and "/torch/" not in maps
