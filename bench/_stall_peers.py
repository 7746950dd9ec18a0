"""The peers ``bench/stall.py`` compares ckptd with: DCP async_save, DLRover flash checkpoint, torch.save.

DCP and DLRover run in child processes, ``stall.py --child dcp|dlrover`` (``child_main``), each
building the same state from the same seed: process groups and a forked saver must not share a
process with the gRPC client. ``run_child`` runs the DCP child's whole series and returns its
result; the DLRover child is a server (``PeerServer``, driven by ``DlroverPeer``) answering one
save at a time, so its saves interleave with ckptd's. ``torch_save_series`` runs in the bench's
own process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from _stall_report import log
from _util import MIB, REPO, Cleanup, gpt_state

DLROVER_SOCK_DIR = Path("/tmp/ckpt_sock")  # dlrover.python.common.multi_process.SOCKET_TMP_DIR
STALL_SCRIPT = Path(__file__).resolve().with_name("stall.py")  # the children run it with --child


def run_child(kind: str, args: argparse.Namespace, workdir: Path, cleanup: Cleanup,
              env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``stall.py --child KIND`` in its own session; return its result dict (or an error)."""
    result_path = workdir / f"{kind}-result.json"
    log_path = workdir / f"{kind}.log"
    cmd = [sys.executable, str(STALL_SCRIPT), "--child", kind, "--size-mib", str(args.size_mib),
           "--reps", str(args.reps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--dir", str(workdir), "--result", str(result_path)]
    timeout_s = args.child_timeout or (180 + 0.6 * args.size_mib)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, **(env_extra or {})})

    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    cleanup.add(f"{kind} child", kill_group)
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    kill_group()  # also any grandchild left in its session (dlrover's saver process)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    if result_path.exists():
        res: dict[str, Any] = json.loads(result_path.read_text())
        return res
    why = f"timed out after {timeout_s:.0f}s" if rc is None else f"exited with {rc} and no result"
    return {"error": f"{kind} child {why}; log tail: {tail.strip()[-1500:]}"}


def child_main(args: argparse.Namespace) -> int:
    """Entry point of ``--child dcp|dlrover``.

    ``dcp`` measures a whole series and writes the result JSON to ``--result``. ``dlrover`` is a
    server: after building the state and the checkpointer it answers one JSON line per command
    read from stdin (``save``; anything else ends it) on ``--reply-fd``, so the parent can
    interleave its saves with the other methods'.
    """
    reply: TextIO | None = os.fdopen(args.reply_fd, "w", buffering=1) if args.reply_fd >= 0 else None
    try:
        state, _ = gpt_state(args.size_mib * MIB, args.seed)
        if args.child == "dcp":
            Path(args.result).write_text(json.dumps(child_dcp(args, state)))
        else:
            assert reply is not None
            child_dlrover(args, state, reply)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        import traceback

        traceback.print_exc()
        err = {"error": f"{type(exc).__name__}: {exc}"}
        if reply is not None:
            reply.write(json.dumps(err) + "\n")
        elif args.result:
            Path(args.result).write_text(json.dumps(err))
    return 0


def child_dcp(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import async_save

    workdir = Path(args.dir)
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'dcp-pg-init'}", rank=0, world_size=1)
    out: dict[str, Any] = {"variants": {}}
    try:
        accel = torch.accelerator.is_available()
        for variant, async_staging in (("sync_staging", False), ("async_staging", True)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                stager = DefaultStager(StagingOptions(
                    use_pinned_memory=True, use_shared_memory=True,
                    use_async_staging=async_staging, use_non_blocking_copy=accel,
                ))
            inner = getattr(stager, "_state_dict_stager", None)
            v: dict[str, Any] = {
                "options": {"use_pinned_memory": True, "use_shared_memory": True,
                            "use_async_staging": async_staging, "use_non_blocking_copy": accel},
                "pinned_effective": bool(getattr(inner, "pin_memory", False)),
                "shared_effective": bool(getattr(inner, "share_memory", False)),
                "warnings": sorted({str(w.message).strip() for w in caught}),
                "call_s": [], "until_mutable_s": [], "total_s": [],
            }
            try:
                warmup = min(args.warmup, 2)  # the first save fills the stager's cache; each writes to disk
                for i in range(warmup + args.reps):
                    ckpt_dir = workdir / "dcp" / f"{variant}-{i}"
                    t0 = time.perf_counter()
                    resp: Any = async_save(state, checkpoint_id=str(ckpt_dir), async_stager=stager)
                    t_call = time.perf_counter() - t0
                    staging = getattr(resp, "staging_completion", None)
                    upload = getattr(resp, "upload_completion", resp)
                    if staging is not None:
                        staging.result()
                    t_mutable = time.perf_counter() - t0
                    upload.result()
                    t_total = time.perf_counter() - t0
                    if i >= warmup:
                        v["call_s"].append(t_call)
                        v["until_mutable_s"].append(t_mutable)
                        v["total_s"].append(t_total)
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
            finally:
                stager.close()
            out["variants"][variant] = v
    finally:
        dist.destroy_process_group()
    return out


def child_dlrover(args: argparse.Namespace, state: dict[str, Any], reply: TextIO) -> None:
    from dlrover.trainer.torch.flash_checkpoint.checkpointer import StorageType  # type: ignore[import-untyped]
    from dlrover.trainer.torch.flash_checkpoint.ddp import DdpCheckpointer  # type: ignore[import-untyped]

    t0 = time.perf_counter()
    checkpointer = DdpCheckpointer(str(Path(args.dir) / "dlrover"))
    engine = checkpointer._engine
    reply.write(json.dumps({"ready": True, "init_s": time.perf_counter() - t0,
                            "version": _dist_version("dlrover"),
                            "run_id": os.environ.get("TORCHELASTIC_RUN_ID", "")}) + "\n")
    step = 0
    for line in sys.stdin:
        if line.strip() != "save":
            break
        step += 1
        t0 = time.perf_counter()
        checkpointer.save_checkpoint(step, state, storage_type=StorageType.MEMORY)
        dt = time.perf_counter() - t0
        # DLRover skips the copy (and returns quickly) when its shm lock is busy: not a real save
        reply.write(json.dumps({"s": dt, "ok": getattr(engine, "_cached_step", step) == step}) + "\n")
    with contextlib.suppress(Exception):
        engine.close()


class PeerServer:
    """A ``--child`` server process: send a command line, read one JSON reply line."""

    def __init__(self, kind: str, args: argparse.Namespace, workdir: Path, cleanup: Cleanup,
                 env_extra: dict[str, str]) -> None:
        self.kind = kind
        self.log_path = workdir / f"{kind}.log"
        rfd, wfd = os.pipe()
        cmd = [sys.executable, str(STALL_SCRIPT), "--child", kind, "--size-mib", str(args.size_mib),
               "--seed", str(args.seed), "--dir", str(workdir), "--reply-fd", str(wfd)]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                                         cwd=REPO, start_new_session=True, pass_fds=(wfd,),
                                         env={**os.environ, **env_extra})
        os.close(wfd)
        self.rfd = rfd
        self.buf = b""
        cleanup.add(f"{kind} server", self.close)

    def _line(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.kind} child did not answer within {timeout_s:.0f}s")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if ready:
                chunk = os.read(self.rfd, 65536)
                if not chunk:
                    raise EOFError(f"{self.kind} child exited (rc {self.proc.poll()}): {self.log_tail()}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    def request(self, cmd: str | None, timeout_s: float) -> dict[str, Any]:
        """Send ``cmd`` (None: nothing, just read the next reply) and return the reply."""
        if cmd is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(cmd.encode() + b"\n")
            self.proc.stdin.flush()
        return self._line(timeout_s)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:].strip()
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # and its forked saver, if still there
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.rfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.rfd)
            self.rfd = -1


class DlroverPeer:
    """The DLRover child server, driven save by save; ``info`` holds its version, init time, skips, error.

    A failure (at start or in a save) is recorded in ``info["error"]`` and stops the child; every
    later ``save`` then returns None.
    """

    def __init__(self, args: argparse.Namespace, workdir: Path, cleanup: Cleanup, tag: str) -> None:
        run_id = f"ckptdbench{tag}"
        existed = DLROVER_SOCK_DIR.exists()
        cleanup.add("dlrover shm and sockets", lambda: dlrover_cleanup(run_id, existed))
        self.server: PeerServer | None = PeerServer("dlrover", args, workdir, cleanup,
                                                    {"TORCHELASTIC_RUN_ID": run_id})
        self.info: dict[str, Any] = {}
        self.ready_timeout_s = 120 + 0.2 * args.size_mib
        self.save_timeout_s = 60 + 0.2 * args.size_mib

    def wait_ready(self) -> None:
        """Wait until the child has built its state and checkpointer."""
        if self.server is None:
            return
        try:
            ready = self.server.request(None, self.ready_timeout_s)
        except (TimeoutError, EOFError, ValueError, OSError) as exc:
            ready = {"error": str(exc)}
        if "error" in ready:
            self._fail(f"DLRover could not start standalone: {ready['error']}")
        else:
            self.info.update(ready)

    def save(self) -> float | None:
        """One interleaved DLRover save; None if it was skipped or failed (or the child is gone)."""
        if self.server is None:
            return None
        try:
            r = self.server.request("save", self.save_timeout_s)
            if "error" in r:
                raise RuntimeError(r["error"])
        except (RuntimeError, TimeoutError, EOFError, ValueError, OSError) as exc:
            self._fail(f"DLRover save failed: {exc}")
            return None
        if not r["ok"]:
            self.info["skipped"] = self.info.get("skipped", 0) + 1
            return None
        return float(r["s"])

    def _fail(self, why: str) -> None:
        self.info["error"] = why
        self.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def dlrover_cleanup(run_id: str, sock_dir_existed: bool) -> None:
    for p in Path("/dev/shm").glob(f"{run_id}*"):
        p.unlink(missing_ok=True)
    shutil.rmtree(DLROVER_SOCK_DIR / run_id, ignore_errors=True)
    if not sock_dir_existed:
        with contextlib.suppress(OSError):
            DLROVER_SOCK_DIR.rmdir()  # only if empty


def torch_save_series(state: Any, workdir: Path, args: argparse.Namespace) -> list[float]:
    import torch

    log("torch.save + fsync")
    ts: list[float] = []
    warmup = min(args.warmup, 1)  # torch.save keeps no state between calls
    for i in range(warmup + args.reps):
        p = workdir / f"torch-save-{i}.pt"
        t0 = time.perf_counter()
        with open(p, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        p.unlink()
        if i >= warmup:
            ts.append(dt)
    return ts
