"""Import hygiene: the client stays light (no boto3, no daemon parts); the daemon never imports torch.

The client-only install (``pip install ckptd``, no extras) must be enough for training: its base
dependencies are the client's, and the client saves and restores with every daemon-only package
made unimportable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

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


CLIENT_FORBIDDEN = ("boto3", "botocore", "s3transfer", "zstandard", "aiofiles", "prometheus_client", "ckptd.tiers",
                    "ckptd.daemon", "ckptd.rpc", "ckptd.drains", "ckptd.restore", "ckptd.memory", "ckptd.peers",
                    "ckptd.save", "ckptd.ctl", "ckptd.core.metrics", "torch", "transformers", "pytorch_lightning",
                    "lightning_fabric", "safetensors")


#: Distributions only the daemon (or the object tier, or the dev tools) uses: never a base dependency.
DAEMON_ONLY_DISTS = {"boto3", "botocore", "s3transfer", "urllib3", "zstandard", "prometheus-client",
                     "grpcio-health-checking", "aiofiles", "torch", "moto"}
#: Top-level modules of the base dependencies (grpcio, protobuf, numpy, awscrt) and of theirs.
BASE_MODULES = {"grpc", "google", "numpy", "awscrt", "_awscrt", "typing_extensions"}
#: Modules a client-only install lacks; the probe below makes them unimportable.
BLOCKER = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
""".format(blocked=sorted({"boto3", "botocore", "s3transfer", "zstandard", "prometheus_client", "grpc_health",
                           "aiofiles", "torch", "grpc_tools"}))


def _dist_name(requirement: str) -> str:
    name = requirement
    for sep in "<>=!~[;( ":
        name = name.split(sep)[0]
    return name.strip().lower().replace("_", "-")


def test_base_dependencies_are_the_clients() -> None:
    """pyproject's base dependencies are what the client needs; the daemon's are in extras."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    base = {_dist_name(r) for r in project["dependencies"]}
    assert base == {"grpcio", "protobuf", "numpy", "awscrt"}
    assert not base & DAEMON_ONLY_DISTS
    extras = project["optional-dependencies"]
    assert {"grpcio-health-checking", "prometheus-client"} <= {_dist_name(r) for r in extras["daemon"]}
    assert "boto3" in {_dist_name(r) for r in extras["s3"]}


def test_client_imports_only_base_dependencies() -> None:
    """With every daemon-only package unimportable, the client's modules import and use only the base set."""
    mods = modules_after(BLOCKER + "import ckptd_client, ckptd_client.tree, ckptd_client.rpc, "
                                   "ckptd_client.restore.stream, ckptd_client.restore.premap, "
                                   "ckptd_client.restore.slot_copy\n"
                                   "from ckptd_client import CheckpointManager, Level")
    third_party = {m.partition(".")[0] for m in mods if not m.startswith("_")} - set(sys.stdlib_module_names)
    third_party -= {"ckptd", "ckptd_client", "cython_runtime"}  # cython_runtime: made by compiled extensions
    assert third_party <= BASE_MODULES, third_party - BASE_MODULES


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


def test_client_only_install_saves_and_restores(daemon_factory: Callable[..., DaemonProc]) -> None:
    """A trainer process where no daemon-only package (nor torch) can be imported saves and restores."""
    d = daemon_factory()
    code = BLOCKER + f"""
import numpy as np
from ckptd_client import CheckpointManager, Level
with CheckpointManager("client-only-job", rank=0, world_size=1, addr={d.addr!r}) as m:
    m.save(3, {{"x": np.arange(12, dtype=np.float32)}}).wait(Level.LOCAL_DURABLE, timeout_s=60)
    out = {{"x": np.zeros(12, dtype=np.float32)}}
    assert m.restore(out) == 3 and out["x"].tolist() == list(range(12))
print("restored")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=clean_env())
    assert res.returncode == 0 and res.stdout.strip().endswith("restored"), res.stderr
