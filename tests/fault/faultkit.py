"""Helpers shared by the fault suite: bit-exact comparison, raw RPCs, on-disk and in-shm
inspection of a daemon's state, failpoint logs.

Everything here works on real processes and real files; nothing is mocked. States come from
tests/state_factory.py (``fault_state``: numpy only, so trainer processes start in well under a
second).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from ckptd_client import CheckpointManager

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from tests.state_factory import blank_like

HERE = Path(__file__).resolve().parent
TRAINER = HERE / "fault_trainer.py"
JOB = "faultjob"

TIER_STATE = {1: "PENDING", 2: "IN_PROGRESS", 3: "COMMITTED", 4: "FAILED", 5: "SKIPPED", 6: "REMOVED"}


# -- comparison ----------------------------------------------------------------------------
def assert_bit_exact(got: Any, want: Any, path: str = "") -> None:
    """Compare byte for byte (dtype, shape and raw bytes), recursing into containers."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_bit_exact(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_bit_exact(g, w, f"{path}[{i}]")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), f"{path}: bytes differ"
    elif isinstance(want, float):
        assert got.hex() == want.hex(), f"{path}: {got!r} != {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


# -- clients --------------------------------------------------------------------------------
def manager(addr: Any, rank: int = 0, world_size: int = 1, **kw: Any) -> CheckpointManager:
    return CheckpointManager(JOB, rank=rank, world_size=world_size, addr=addr, **kw)


def restore_checked(m: CheckpointManager, step: int | str, want: Any, served_from: str) -> None:
    """Restore into a blank state and assert the tier that served it and exact bytes."""
    state = blank_like(want)
    got = m.restore(state, step=step)
    assert got == want["step"], f"restored step {got}, expected {want['step']}"
    assert m.last_restore is not None
    assert m.last_restore.served_from == served_from, (
        f"served from {m.last_restore.served_from!r}, expected {served_from!r} "
        f"(rejected: {m.last_restore.rejected})")
    assert_bit_exact(state, want)


class Raw:
    """A raw stub on a daemon's socket, for RPCs the manager does not expose as such."""

    def __init__(self, addr: Any) -> None:
        self.channel = grpc.insecure_channel(f"unix:{addr}")
        self.stub = pb_grpc.CheckpointServiceStub(self.channel)

    def status(self) -> Any:
        return self.stub.DaemonStatus(pb.DaemonStatusRequest(), timeout=10)

    def step_status(self, step: int, job: str = JOB) -> Any:
        return self.stub.GetStepStatus(pb.GetStepStatusRequest(job=job, step=step), timeout=10)

    def tier_state(self, step: int, tier: str, job: str = JOB) -> str:
        for t in self.step_status(step, job).tiers:
            if t.tier == tier:
                return TIER_STATE[t.state]
        raise AssertionError(f"no {tier} tier in status of step {step}")

    def wait_step(self, step: int, level: int, timeout_s: float = 60.0, job: str = JOB) -> Any:
        """WaitStep for ``level`` (a ckptd.core.types.Level value); raises grpc.RpcError on failure."""
        return self.stub.WaitStep(pb.WaitStepRequest(
            job=job, step=step, level=level, timeout_ms=int(timeout_s * 1000)), timeout=timeout_s + 10)

    def list_steps(self, job: str = JOB) -> Any:
        return self.stub.ListSteps(pb.ListStepsRequest(job=job), timeout=10)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rpc_code(fn: Callable[[], Any]) -> grpc.StatusCode | None:
    """Run a raw RPC; return its error status code, or None if it succeeded."""
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return,attr-defined]
    return None


def committed_steps_everywhere(m: CheckpointManager, raw: Raw) -> dict[str, Any]:
    """What every query path says is committed: all_steps, latest_step, ListSteps."""
    try:
        listed = [s.step for s in raw.list_steps().steps if s.committed]
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        listed = []
    return {"all_steps": m.all_steps(), "latest": m.latest_step(), "listed": listed}


# -- waiting --------------------------------------------------------------------------------
def wait_until(pred: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def wait_log(d: Any, needle: str, timeout_s: float = 20.0) -> str:
    return wait_until(lambda: needle in d.log() and d.log(), timeout_s, f"{needle!r} in daemon log")  # type: ignore[no-any-return]


def wait_dead(d: Any, timeout_s: float = 30.0) -> int:
    """Wait for a daemon that is expected to kill itself (failpoint); return its exit status."""
    return d.proc.wait(timeout_s)  # type: ignore[no-any-return]


# -- disk and shm inspection ----------------------------------------------------------------
def job_dir(root: Path, job: str = JOB) -> Path:
    return root / "data" / job


def step_dir(root: Path, step: int, job: str = JOB) -> Path:
    return job_dir(root, job) / f"step-{step:012d}"


def shard_file(root: Path, step: int, rank: int = 0, job: str = JOB) -> Path:
    return step_dir(root, step, job) / f"rank-{rank:06d}.shard"


def disk_leftovers(root: Path, job: str = JOB) -> list[str]:
    """Temp dirs and step dirs without a manifest: what recovery must leave none of."""
    jd = job_dir(root, job)
    bad: list[str] = []
    if not jd.exists():
        return bad
    for p in jd.iterdir():
        if p.name.startswith(".tmp-"):
            bad.append(str(p))
        elif p.is_dir():
            bad += [str(q) for q in p.iterdir() if q.name.startswith(".tmp-")]
            if not (p / "manifest.json").is_file():
                bad.append(f"{p} (no manifest)")
    return sorted(bad)


def sidecars(shm_dir: Path) -> dict[Path, dict[str, Any]]:
    """slot file -> its sidecar (only slots holding a checksummed shard have one)."""
    out = {}
    for meta in sorted(shm_dir.glob("slot-*.meta.json")):
        out[meta.with_name(meta.name[: -len(".meta.json")] + ".bin")] = json.loads(meta.read_bytes())
    return out


def slot_of(shm_dir: Path, step: int, rank: int = 0) -> tuple[Path, dict[str, Any]]:
    for path, meta in sidecars(shm_dir).items():
        if meta["step"] == step and meta["shard"]["rank"] == rank:
            return path, meta
    raise AssertionError(f"no slot with a sidecar for step {step} rank {rank} in {shm_dir}")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def failpoint_hits(log_path: Path, name: str) -> int:
    if not log_path.exists():
        return 0
    return sum(1 for line in log_path.read_text().splitlines() if line == name)


def python() -> str:
    return sys.executable


# -- trainer subprocesses -------------------------------------------------------------------
def spawn_trainer(mode: str, addr: Any, last_step: int, nbytes: int, rank: int = 0,
                  world_size: int = 1) -> Any:
    import subprocess

    return subprocess.Popen(
        [python(), str(TRAINER), mode, str(addr), str(last_step), str(nbytes), str(rank),
         str(world_size)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def read_line(proc: Any, prefix: str) -> str:
    """Read the trainer's stdout until a line starting with prefix (fail if it exits first)."""
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise AssertionError(f"trainer exited ({proc.returncode}) before {prefix!r}:\n"
                                 f"{proc.stderr.read()}")
        if line.startswith(prefix):
            return line.strip()  # type: ignore[no-any-return]


def sigkill(proc: Any) -> None:
    """SIGKILL a subprocess and reap it (a zombie would still look alive in /proc)."""
    import signal

    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def verify_disk_step(root: Path, step: int, staged_crcs: dict[int, list[int]], job: str = JOB) -> None:
    """Check a committed step on disk without a daemon: the manifest parses, every shard file
    has the recorded size and chunk crc32c, and those equal the crcs taken at staging."""
    from ckptd.core.integrity import chunk_crcs
    from ckptd.core.manifest import Manifest

    sd = step_dir(root, step, job)
    manifest = Manifest.from_json((sd / "manifest.json").read_bytes())
    assert (manifest.job, manifest.step) == (job, step)
    assert sorted(s.rank for s in manifest.shards) == sorted(staged_crcs)
    for s in manifest.shards:
        data = (sd / s.key).read_bytes()
        assert len(data) == s.nbytes, f"{s.key}: {len(data)} bytes, manifest says {s.nbytes}"
        assert chunk_crcs(data, s.chunk_bytes) == list(s.chunk_crc32c), f"{s.key}: crc32c mismatch"
        assert list(s.chunk_crc32c) == staged_crcs[s.rank], f"{s.key}: not the staged bytes"
