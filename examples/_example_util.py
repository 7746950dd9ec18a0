"""What the framework examples share: the crash-and-resume harness and the state digests.

``crash_and_resume`` is the whole run of ``hf_trainer.py`` and ``lightning.py``: it starts a
``ckptd serve`` of its own (``_demo_cluster.Daemon``: private root, socket and /dev/shm
directory), runs the example's ``worker`` mode once with the arguments that make it SIGKILL
itself, then once more to resume (and compare with an uninterrupted run), stops the daemon and
removes what it made. Each worker's last stdout line is its JSON report (``run_worker``);
``run_example`` does all that and prints the example's last line (a JSON object);
``worker_parser`` is the command line both examples share (their ``worker`` mode's flags added).
``model_digest`` is the sha256 of a model's ``state_dict`` (names and bytes); ``state_digests``
the sha256 of every global tensor of a (DTensor) state, as ``fsdp2_dcp.py`` and
tests/_dcp_worker.py compare them (collective: every rank calls it, in the same order). torch is
imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any


def model_digest(model: Any) -> str:
    """sha256 over the model's state_dict: each name, then its tensor's bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().reshape(-1).numpy().tobytes())
    return h.hexdigest()


def state_digests(state: Any, path: str = "") -> dict[str, str]:
    """dtype, shape and sha256 of every global tensor by its path (DTensors gathered: collective)."""
    import torch
    from torch.distributed.tensor import DTensor

    out: dict[str, str] = {}
    if isinstance(state, dict):
        for k in sorted(state, key=str):
            out.update(state_digests(state[k], f"{path}.{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(state_digests(v, f"{path}.{i}"))
    elif isinstance(state, torch.Tensor):
        t = state.full_tensor() if isinstance(state, DTensor) else state
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[path] = f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(raw).hexdigest()
    else:
        out[path] = repr(state)
    return out


def run_worker(script: Path, addr: str, job: str, extra: list[str]) -> dict[str, Any]:
    """Run ``script worker`` to its end; its exit status and its last stdout line (a JSON report)."""
    cmd = [sys.executable, str(script), "worker", "--addr", addr, "--job", job, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"trainer exited {proc.returncode} without a report:\n{proc.stderr[-3000:]}")
    return {"returncode": proc.returncode, **json.loads(lines[-1])}


def crash_and_resume(script: Path, name: str, crash: list[str], resume: list[str]) -> tuple[dict[str, Any],
                                                                                           dict[str, Any]]:
    """Under a daemon of its own: the worker run that crashes, then the one that resumes; both reports."""
    from _demo_cluster import Daemon

    with tempfile.TemporaryDirectory(prefix=f"ckptd-{name}-") as tmp:
        base = Path(tmp)
        sock_dir = Path(tempfile.mkdtemp(prefix=f"ck{name}-", dir="/tmp"))
        daemon = Daemon(base / "root", sock_dir / "d.sock", Path("/dev/shm") / f"ckptd-{name}-{uuid.uuid4().hex[:8]}",
                        base / "daemon.log")
        daemon.spawn()
        try:
            daemon.wait_ready()
            job = f"{name}-{uuid.uuid4().hex[:6]}"
            crashed = run_worker(script, str(daemon.socket), job, crash)
            resumed = run_worker(script, str(daemon.socket), job, resume)
        finally:
            daemon.stop()
            subprocess.run(["rm", "-rf", str(sock_dir), str(daemon.shm_dir)], check=False)
    return crashed, resumed


def run_example(script: Path, name: str, crash: list[str], resume: list[str], crashed_key: str) -> int:
    """The example's whole run: its last line (JSON) and its exit status (0 if the weights are identical)."""
    crashed, resumed = crash_and_resume(script, name, crash, resume)
    print(json.dumps({crashed_key: crashed.get(crashed_key), "crash_returncode": crashed["returncode"],
                      "resumed_from_step": resumed["resumed_from_step"], "served_from": resumed["served_from"],
                      "global_step": resumed["global_step"], "identical": resumed["identical"]}))
    return 0 if resumed["identical"] else 1


def worker_parser(doc: str, seed: int) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The example's parser and its ``worker`` subparser with the flags every example's worker has."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_subparsers(dest="mode").add_parser("worker")
    w.add_argument("--addr", required=True)
    w.add_argument("--job", required=True)
    w.add_argument("--seed", type=int, default=seed)
    w.add_argument("--reference", action="store_true", help="also run uninterrupted and compare the weights")
    return p, w
