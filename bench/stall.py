"""How long does a checkpoint save stall training, and how fast does it reach the disk?

One run measures, on one GPT-like state (``--size-mib``, default 1024; 304 tensors: bf16 model
weights plus fp32 master weights and Adam ``exp_avg``/``exp_avg_sq``), ``--reps`` repetitions
of each method after ``--warmup`` untimed ones (at most 2 for DCP and 1 for torch.save, whose
warm-ups write whole checkpoints to disk), and reports medians (every sample is in the JSON):

Save stall (the time the training loop is blocked), against the memcpy floor:
  floor_s               bare copy of the same bytes, tensor by tensor, into a /dev/shm file that
                        was posix_fallocate'd, mmap'ed and madvise(MADV_POPULATE_WRITE)'d before
                        timing and is reused (ckptd's shard layout, 64-byte aligned offsets). Two
                        copy engines are timed, torch ``Tensor.copy_`` into pre-built views and
                        ``ctypes.memmove``; floor_s is the faster median.
  ckptd_stall_s         ``CheckpointManager.save`` against a real ``ckptd serve`` subprocess
                        whose budget holds exactly two slots; warm-up saves first, so slots and the
                        client's mappings are reused; each timed save is of a new, increasing step
                        and is drained to LOCAL_DURABLE before the next (no back-pressure waits).
  torch_save_s          ``torch.save`` of the state to a file in ``--dir``, plus its fsync.
  dcp_async_blocking_s  ``torch.distributed.checkpoint.async_save`` (world size 1, gloo process
                        group, file:// init) with one persistent ``DefaultStager`` reused across
                        saves, ``StagingOptions(use_pinned_memory=True, use_shared_memory=True)``
                        (pinning needs CUDA; torch ignores it on a CPU-only host and the JSON
                        says so). Two variants: synchronous staging, where the call blocks until
                        the state is copied; and ``use_async_staging=True``, where the call
                        returns first and the caller must wait for ``staging_completion`` before
                        it may modify the state. The figure is the time until the caller may
                        modify the state again, the better of the two variants; the bare return
                        time of the async-staging call is reported as dcp_async_call_return_s.
                        Each save's upload future is awaited before the next save.
  dlrover_stall_s       DLRover Flash Checkpoint, ``DdpCheckpointer.save_checkpoint(...,
                        storage_type=StorageType.MEMORY)``, standalone: no elastic agent, so the
                        checkpointer forks its own saver process (``start_saver_process``); a
                        private TORCHELASTIC_RUN_ID isolates its sockets and shared memory.
  DCP and DLRover run in child processes (each builds the same state from the same seed):
  process groups and a forked saver must not share a process with the gRPC client. The DLRover
  child is driven save by save, so its saves are interleaved with ckptd's (see below).

Disk drain, against the fsync floor:
  fsync_buffered_s      the same bytes (the shard's size) written sequentially in 8 MiB blocks
                        with write(2) to a new file in ``--dir``, then fsync.
  fsync_direct_s        the same with O_DIRECT: 8 MiB page-aligned blocks from the /dev/shm
                        mapping, the unaligned tail (if any) buffered, then fsync.
  fsync_floor_s         the faster of the two medians.
  ckptd_drain_s         from the return of ``save`` to ``wait(Level.LOCAL_DURABLE)`` returning:
                        the daemon's checksum of the slot plus its disk commit (shard file,
                        fsyncs, link, manifest). ckptd_drain_daemon_s is the daemon's own figure
                        for the disk commit alone, parsed from its "LOCAL_DURABLE" log line.
  Each repetition runs the floor copies, one ckptd save and its drain, one DLRover save, then one
  buffered and one O_DIRECT write, so these methods see the same machine conditions (paired
  per-repetition ratios are reported too); files are deleted after use. torch.save and DCP
  follow the repetitions. On a loaded host the figures swing widely: the load average before
  and after, and per repetition, is in the JSON.

Output: a table on stdout and, with ``--json``, a last line holding one JSON object (medians,
every sample, ratios, and the machine context). The daemon, temp files and /dev/shm files are
removed on exit, also after an error or SIGTERM. ``--skip-peers`` skips torch.save, DCP and
DLRover; ``--quick`` is ``--size-mib 64 --reps 3 --warmup 2``.

    .venv/bin/python bench/stall.py --json
    .venv/bin/python bench/stall.py --size-mib 32 --reps 2 --json --skip-peers
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from _util import (
    GIB,
    MIB,
    REPO,
    Cleanup,
    ShmFile,
    gib_per_s,
    gpt_state,
    median,
    packed_offsets,
    raise_on_signals,
    same_filesystem,
    tensors_of,
)

BLOCK = 8 * MIB
SLOT_ALIGN = 2 * MIB  # ckptd.shm.SLOT_ALIGN_BYTES
PEERS = ("torch_save", "dcp", "dlrover")
DLROVER_SOCK_DIR = Path("/tmp/ckpt_sock")  # dlrover.python.common.multi_process.SOCKET_TMP_DIR
_DURABLE_RE = re.compile(r"step (?P<job>\S+)@(?P<step>\d+) LOCAL_DURABLE \((?P<bytes>\d+) bytes in (?P<s>[0-9.]+)s\)")


def log(msg: str) -> None:
    print(f"[stall] {msg}", file=sys.stderr, flush=True)


# -- the memcpy floor -----------------------------------------------------------------------------
class FloorCopier:
    """Copies the state's tensors into a pre-faulted shm mapping; the views are built once."""

    def __init__(self, tensors: list[Any], offsets: list[int], shm: ShmFile) -> None:
        import torch

        self.pairs: list[tuple[Any, Any]] = []
        self.raw: list[tuple[int, int, int]] = []
        self._arr: Any = (ctypes.c_char * shm.capacity).from_buffer(shm.mm)
        base = ctypes.addressof(self._arr)
        for t, off in zip(tensors, offsets):
            n = t.numel()
            if n == 0:
                continue
            assert t.is_contiguous() and t.device.type == "cpu"
            dst = torch.frombuffer(shm.mm, dtype=t.dtype, count=n, offset=off).view(t.shape)
            self.pairs.append((t, dst))
            self.raw.append((base + off, t.data_ptr(), n * t.element_size()))

    def torch_copy(self) -> float:
        t0 = time.perf_counter()
        for src, dst in self.pairs:
            dst.copy_(src)
        return time.perf_counter() - t0

    def memmove(self) -> float:
        move = ctypes.memmove
        t0 = time.perf_counter()
        for dst, src, n in self.raw:
            move(dst, src, n)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.pairs.clear()
        self.raw.clear()
        self._arr = None


# -- the fsync floor ------------------------------------------------------------------------------
def write_buffered(path: Path, src: memoryview) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        off, n = 0, src.nbytes
        while off < n:
            off += os.write(fd, src[off : min(off + BLOCK, n)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def write_direct(path: Path, src: memoryview) -> float:
    """O_DIRECT writes of the 4 KiB-aligned body (src must be page-aligned), buffered tail, fsync."""
    n = src.nbytes
    body = n // 4096 * 4096
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        off = 0
        while off < body:
            off += os.pwrite(fd, src[off : min(off + BLOCK, body)], off)
        if body < n:
            os.close(fd)
            fd = os.open(path, os.O_WRONLY)
            while off < n:
                off += os.pwrite(fd, src[off:n], off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


# -- ckptd ----------------------------------------------------------------------------------------
class Daemon:
    """``ckptd serve`` as a subprocess in its own session."""

    def __init__(self, root: Path, shm_dir: Path, socket: Path, budget: int, log_path: Path) -> None:
        self.root, self.shm_dir, self.socket, self.log_path = root, shm_dir, socket, log_path
        self.args = [sys.executable, "-m", "ckptd.cli", "serve", "--root", str(root), "--socket", str(socket),
                     "--shm-dir", str(shm_dir), "--budget-bytes", str(budget), "--log-level", "INFO"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> None:
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)
        from ckptd_client.rpc import wait_until_serving

        from ckptd.errors import DaemonUnavailable

        try:
            wait_until_serving(self.socket, timeout_s, exit_code=self.proc.poll)
        except DaemonUnavailable as exc:
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def drain_seconds(self) -> dict[int, float]:
        """Per step, the daemon's own disk-commit time from its LOCAL_DURABLE log line."""
        out: dict[int, float] = {}
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                msg = str(json.loads(line).get("msg", ""))
            except (ValueError, AttributeError):
                msg = line
            m = _DURABLE_RE.search(msg)
            if m:
                out[int(m["step"])] = float(m["s"])
        return out

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            log("ckptd did not stop within 60s of SIGTERM; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


# -- peers in child processes ---------------------------------------------------------------------
def run_child(kind: str, args: argparse.Namespace, workdir: Path, cleanup: Cleanup,
              env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``stall.py --child KIND`` in its own session; return its result dict (or an error)."""
    result_path = workdir / f"{kind}-result.json"
    log_path = workdir / f"{kind}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--size-mib", str(args.size_mib),
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
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--size-mib", str(args.size_mib),
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


# -- the run --------------------------------------------------------------------------------------
def machine_context(workdir: Path) -> dict[str, Any]:
    import torch

    ctx: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_start": list(os.getloadavg()),
        "dir": str(workdir),
    }
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ctx["mem_total_gib"] = round(int(line.split()[1]) * 1024 / GIB, 1)
    with contextlib.suppress(OSError):
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(workdir).startswith(parts[1]) and len(parts[1]) >= len(best):
                best = parts[1]
                ctx["dir_fs"] = f"{parts[2]} on {parts[1]} ({parts[0]})"
    return ctx


def default_base_dir() -> Path:
    tmp = Path(tempfile.gettempdir())
    return tmp if same_filesystem(tmp, REPO) else REPO


def run(args: argparse.Namespace, cleanup: Cleanup) -> dict[str, Any]:
    from ckptd_client import CheckpointManager, Level

    peers = [] if args.skip_peers else [p for p in args.peers.split(",") if p]
    base = Path(args.dir) if args.dir else default_base_dir()
    workdir = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=base))
    cleanup.add("work dir", lambda: shutil.rmtree(workdir, ignore_errors=True))
    tag = uuid.uuid4().hex[:10]
    ctx = machine_context(workdir)

    # DLRover builds its own copy of the state in a child while we build ours
    dl: PeerServer | None = None
    dl_info: dict[str, Any] = {}
    if "dlrover" in peers:
        run_id = f"ckptdbench{tag}"
        existed = DLROVER_SOCK_DIR.exists()
        cleanup.add("dlrover shm and sockets", lambda: dlrover_cleanup(run_id, existed))
        dl = PeerServer("dlrover", args, workdir, cleanup, {"TORCHELASTIC_RUN_ID": run_id})

    log(f"building a {args.size_mib} MiB GPT-like state in {workdir}")
    state, info = gpt_state(args.size_mib * MIB, args.seed)
    tensors = tensors_of(state)
    offsets, layout_bytes = packed_offsets(tensors)
    res: dict[str, Any] = {
        "bench": "stall", "bytes": info.nbytes, "layout_bytes": layout_bytes, "size_mib": args.size_mib,
        "tensors": len(tensors), "reps": args.reps, "warmup": args.warmup,
        "state": {"d_model": info.d_model, "vocab": info.vocab, "n_layer": info.n_layer, "params": info.n_params,
                  "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors})},
    }

    # the floor's mapping, pre-faulted before any timing
    floor_shm = ShmFile(Path("/dev/shm") / f"ckptd-bench-floor-{tag}", layout_bytes)
    cleanup.add("floor shm file", floor_shm.close)
    res["floor_prefaulted_with"] = "madvise(MADV_POPULATE_WRITE)" if floor_shm.populated else "touching every page"
    copier = FloorCopier(tensors, offsets, floor_shm)
    cleanup.add("floor views", copier.close)

    # a ckptd daemon with room for exactly two slots of this shard
    slot = (layout_bytes + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
    budget = 2 * slot + 2 * SLOT_ALIGN
    sock_dir = Path(tempfile.mkdtemp(prefix="ckb-", dir="/tmp"))
    cleanup.add("socket dir", lambda: shutil.rmtree(sock_dir, ignore_errors=True))
    shm_dir = Path("/dev/shm") / f"ckptd-bench-{tag}"
    cleanup.add("ckptd shm dir", lambda: shutil.rmtree(shm_dir, ignore_errors=True))
    daemon = Daemon(workdir / "ckptd-root", shm_dir, sock_dir / "ckptd.sock", budget, workdir / "ckptd.log")
    cleanup.add("ckptd daemon", daemon.stop)
    daemon.start()
    mgr = CheckpointManager("bench", rank=0, world_size=1, addr=str(daemon.socket), on_error="raise")
    cleanup.add("ckptd client", mgr.close)
    res["ckptd_budget_bytes"] = budget
    res["temp_paths"] = [str(workdir), str(floor_shm.path), str(shm_dir), str(sock_dir)]  # all removed on exit

    from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb

    def daemon_slots() -> int:
        return int(mgr.conn.call(mgr.conn.stub.DaemonStatus, pb.DaemonStatusRequest()).slots)

    dl_timeout = 60 + 0.2 * args.size_mib

    def dlrover_save() -> float | None:
        """One interleaved DLRover save; None (and dl_info['error']) once it failed."""
        nonlocal dl
        if dl is None:
            return None
        try:
            r = dl.request("save", dl_timeout)
            if "error" in r:
                raise RuntimeError(r["error"])
        except (RuntimeError, TimeoutError, EOFError, ValueError, OSError) as exc:
            dl_info["error"] = f"DLRover save failed: {exc}"
            dl.close()
            dl = None
            return None
        if not r["ok"]:
            dl_info["skipped"] = dl_info.get("skipped", 0) + 1
            return None
        return float(r["s"])

    if dl is not None:
        try:
            ready = dl.request(None, 120 + 0.2 * args.size_mib)
        except (TimeoutError, EOFError, ValueError, OSError) as exc:
            ready = {"error": str(exc)}
        if "error" in ready:
            dl_info["error"] = f"DLRover could not start standalone: {ready['error']}"
            dl.close()
            dl = None
        else:
            dl_info.update(ready)

    durable_timeout = 120 + 2.0 * args.size_mib
    step = 0
    log(f"warm-up: {max(args.warmup, 1)} saves of each in-memory method, one write of each kind")
    for _ in range(max(args.warmup, 1)):
        step += 1
        copier.torch_copy()
        copier.memmove()
        mgr.save(step, state).wait(Level.LOCAL_DURABLE, timeout_s=durable_timeout)
        dlrover_save()
    for name, fn in (("buffered", write_buffered), ("direct", write_direct)):
        p = workdir / f"warm-{name}.bin"
        with contextlib.suppress(OSError):
            fn(p, memoryview(floor_shm.mm)[:layout_bytes])
        p.unlink(missing_ok=True)
    res["ckptd_slots_after_warmup"] = daemon_slots()

    s: dict[str, list[float]] = {k: [] for k in (
        "floor_torch_copy", "floor_memmove", "ckptd_stall", "ckptd_stall_client", "ckptd_begin_save",
        "ckptd_drain", "dlrover_stall", "fsync_buffered", "fsync_direct")}
    paired_floor: list[float] = []
    paired_dl: list[float] = []
    direct_error: str | None = None
    timed_steps: list[int] = []
    load_per_rep: list[float] = []
    for rep in range(args.reps):
        load_per_rep.append(os.getloadavg()[0])
        s["floor_torch_copy"].append(copier.torch_copy())
        s["floor_memmove"].append(copier.memmove())
        step += 1
        t0 = time.perf_counter()
        h = mgr.save(step, state)
        t1 = time.perf_counter()
        h.wait(Level.LOCAL_DURABLE, timeout_s=durable_timeout)
        t2 = time.perf_counter()
        timed_steps.append(step)
        s["ckptd_stall"].append(t1 - t0)
        s["ckptd_stall_client"].append(h.stall_s)
        s["ckptd_begin_save"].append(h.waited_s)
        s["ckptd_drain"].append(t2 - t1)
        paired_floor.append((t1 - t0) / min(s["floor_torch_copy"][-1], s["floor_memmove"][-1]))
        dl_s = dlrover_save()
        if dl_s is not None:
            s["dlrover_stall"].append(dl_s)
            paired_dl.append((t1 - t0) / dl_s)
        src = memoryview(floor_shm.mm)[:layout_bytes]
        p = workdir / f"fsync-buffered-{rep}.bin"
        s["fsync_buffered"].append(write_buffered(p, src))
        p.unlink()
        p = workdir / f"fsync-direct-{rep}.bin"
        try:
            s["fsync_direct"].append(write_direct(p, src))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            direct_error = f"O_DIRECT not supported here: {exc}"
        p.unlink(missing_ok=True)
        src.release()
        log(f"rep {rep + 1}/{args.reps}: floor {min(s['floor_torch_copy'][-1], s['floor_memmove'][-1]):.4f}s "
            f"ckptd stall {t1 - t0:.4f}s drain {t2 - t1:.3f}s"
            + (f" dlrover {dl_s:.4f}s" if dl_s is not None else "")
            + f" fsync buffered {s['fsync_buffered'][-1]:.3f}s"
            + (f" direct {s['fsync_direct'][-1]:.3f}s" if s["fsync_direct"] else ""))
    res["ckptd_slots_after_timed"] = daemon_slots()
    if dl is not None:
        dl.close()

    summarize_core(res, s, stall_diagnostics(mgr, state, daemon_slots), daemon, timed_steps, direct_error)
    res["ckptd_stall_over_floor_paired"] = median(paired_floor)
    res["dlrover_stall_s"] = median(s["dlrover_stall"])
    if res["dlrover_stall_s"] is None and "dlrover" in peers:
        res["dlrover_error"] = dl_info.get("error") or f"every DLRover save was skipped ({dl_info.get('skipped')})"
    elif "dlrover" in peers:
        res["dlrover_stall_min_s"] = min(s["dlrover_stall"])
        res["dlrover_skipped"] = dl_info.get("skipped", 0)
        res["dlrover_version"] = dl_info.get("version")
        res["dlrover_init_s"] = dl_info.get("init_s")
        res["ckptd_stall_over_dlrover_paired"] = median(paired_dl)

    res["torch_save_s"] = None
    if "torch_save" in peers:
        ts = torch_save_series(state, workdir, args)
        res["torch_save_s"], res["torch_save_all_s"] = median(ts), [round(x, 6) for x in ts]
    res["dcp_async_blocking_s"] = None
    if "dcp" in peers:
        log("torch.distributed.checkpoint.async_save (child process)")
        summarize_dcp(res, run_child("dcp", args, workdir, cleanup))

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    res["ckptd_stall_over_floor"] = ratio(res["ckptd_stall_s"], res["floor_s"])
    res["ckptd_drain_over_fsync_floor"] = ratio(res["ckptd_drain_s"], res["fsync_floor_s"])
    res["ckptd_drain_daemon_over_fsync_floor"] = ratio(res["ckptd_drain_daemon_s"], res["fsync_floor_s"])
    res["ckptd_stall_over_dlrover"] = ratio(res["ckptd_stall_s"], res["dlrover_stall_s"])
    res["ckptd_stall_over_dcp"] = ratio(res["ckptd_stall_s"], res["dcp_async_blocking_s"])
    res["ckptd_stall_over_torch_save"] = ratio(res["ckptd_stall_s"], res["torch_save_s"])
    ctx["loadavg_end"] = list(os.getloadavg())
    ctx["loadavg_1min_per_rep"] = load_per_rep
    res["machine"] = ctx
    return res


def stall_diagnostics(mgr: Any, state: Any, rpc: Callable[[], int]) -> dict[str, float | None]:
    """Fixed costs inside a ckptd save: the client's flatten of the state, one RPC round trip."""
    from ckptd_client.tree import flatten

    flat: list[float] = []
    rtt: list[float] = []
    for _ in range(5):
        t0 = time.perf_counter()
        flatten(state)
        flat.append(time.perf_counter() - t0)
    for _ in range(20):
        t0 = time.perf_counter()
        rpc()
        rtt.append(time.perf_counter() - t0)
    return {"ckptd_flatten_s": median(flat), "ckptd_rpc_rtt_s": median(rtt)}


def summarize_core(res: dict[str, Any], s: dict[str, list[float]], diag: dict[str, float | None], daemon: Daemon,
                   timed_steps: list[int], direct_error: str | None) -> None:
    for k, xs in s.items():
        res[f"{k}_all_s"] = [round(x, 6) for x in xs]
    floor_torch, floor_mm = median(s["floor_torch_copy"]), median(s["floor_memmove"])
    res["floor_torch_copy_s"], res["floor_memmove_s"] = floor_torch, floor_mm
    res["floor_s"] = min(x for x in (floor_torch, floor_mm) if x is not None)
    res["floor_method"] = "torch copy_" if res["floor_s"] == floor_torch else "ctypes.memmove"
    res["floor_min_s"] = min(s["floor_torch_copy"] + s["floor_memmove"])
    res["ckptd_stall_s"] = median(s["ckptd_stall"])
    res["ckptd_stall_min_s"] = min(s["ckptd_stall"])
    res["ckptd_stall_client_s"] = median(s["ckptd_stall_client"])
    res["ckptd_begin_save_s"] = median(s["ckptd_begin_save"])
    res.update(diag)
    res["fsync_buffered_s"] = median(s["fsync_buffered"])
    res["fsync_direct_s"] = median(s["fsync_direct"])
    if direct_error:
        res["fsync_direct_error"] = direct_error
    res["fsync_floor_s"] = min(x for x in (res["fsync_buffered_s"], res["fsync_direct_s"]) if x is not None)
    res["ckptd_drain_s"] = median(s["ckptd_drain"])
    per_step = daemon.drain_seconds()
    daemon_drain = [per_step[st] for st in timed_steps if st in per_step]
    res["ckptd_drain_daemon_s"] = median(daemon_drain)
    res["ckptd_drain_daemon_all_s"] = daemon_drain


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


def summarize_dcp(res: dict[str, Any], dcp_res: dict[str, Any]) -> None:
    if "error" in dcp_res:
        res["dcp_error"] = dcp_res["error"]
        return
    best: tuple[float, str] | None = None
    for name, v in dcp_res["variants"].items():
        m_call, m_mut = median(v["call_s"]), median(v["until_mutable_s"])
        v["call_median_s"], v["until_mutable_median_s"] = m_call, m_mut
        v["total_median_s"] = median(v["total_s"])
        if m_mut is not None and (best is None or m_mut < best[0]):
            best = (m_mut, name)
    res["dcp"] = dcp_res["variants"]
    if best is not None:
        res["dcp_async_blocking_s"], res["dcp_config"] = best
    a = dcp_res["variants"].get("async_staging")
    res["dcp_async_call_return_s"] = a["call_median_s"] if a else None


def table(res: dict[str, Any]) -> str:
    n = res["bytes"]
    floor, disk = res["floor_s"], res["fsync_floor_s"]
    # (tier, method, seconds, reference, why-not key)
    rows: list[tuple[str, str, float | None, float | None, str]] = [
        ("save stall", "memcpy floor (pre-faulted /dev/shm)", floor, floor, ""),
        ("save stall", "  torch copy_", res["floor_torch_copy_s"], floor, ""),
        ("save stall", "  ctypes.memmove", res["floor_memmove_s"], floor, ""),
        ("save stall", "ckptd save", res["ckptd_stall_s"], floor, ""),
        ("save stall", "torch.save + fsync", res["torch_save_s"], floor, "torch_save"),
        ("save stall", "DCP async_save (until state mutable)", res["dcp_async_blocking_s"], floor, "dcp"),
        ("save stall", "  DCP async_save call return (async staging)", res.get("dcp_async_call_return_s"), floor,
         "dcp"),
        ("save stall", "DLRover flash ckpt (MEMORY)", res["dlrover_stall_s"], floor, "dlrover"),
        ("disk drain", "fsync floor", disk, disk, ""),
        ("disk drain", "  buffered write + fsync", res["fsync_buffered_s"], disk, ""),
        ("disk drain", "  O_DIRECT write + fsync", res["fsync_direct_s"], disk, "fsync_direct"),
        ("disk drain", "ckptd STAGED -> LOCAL_DURABLE", res["ckptd_drain_s"], disk, ""),
        ("disk drain", "  ckptd disk commit (daemon log)", res["ckptd_drain_daemon_s"], disk, ""),
    ]
    m = res["machine"]
    out = [f"ckptd bench/stall: {n / MIB:.1f} MiB in {res['tensors']} tensors, median of {res['reps']} reps; "
           f"{m['cpu_count']} CPUs, load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}, "
           f"torch {m['torch_version']}",
           f"{'tier':<11} {'method':<46} {'seconds':>9} {'GiB/s':>7} {'x floor':>8}"]
    for tier, name, sec, ref, key in rows:
        if sec is None:
            err = res.get(f"{key}_error") if key else None
            why = "  (failed: see " + f"{key}_error)" if err else ("  (skipped)" if key else "")
            out.append(f"{tier:<11} {name:<46} {'-':>9} {'-':>7} {'-':>8}{why}")
            continue
        x = f"{sec / ref:>7.2f}x" if ref else f"{'-':>8}"
        out.append(f"{tier:<11} {name:<46} {sec:>9.4f} {gib_per_s(n, sec) or 0:>7.2f} {x}")
    out.append("(x floor: save rows against the memcpy floor, disk rows against the fsync floor)")
    out.append(f"ckptd_stall/floor = {res['ckptd_stall_over_floor']} (paired per rep: "
               f"{_r(res.get('ckptd_stall_over_floor_paired'))}); ckptd_stall/dlrover = "
               f"{res['ckptd_stall_over_dlrover']} (paired: {_r(res.get('ckptd_stall_over_dlrover_paired'))}); "
               f"ckptd_drain/fsync_floor = {res['ckptd_drain_over_fsync_floor']}")
    return "\n".join(out)


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=1024, help="state size in MiB (default 1024)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per method (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed saves before timing (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", help="directory on the disk to measure (default: /tmp if it is on the "
                                 "repository's filesystem, else the repository)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--quick", action="store_true", help="--size-mib 64 --reps 3 --warmup 2")
    p.add_argument("--skip-peers", action="store_true", help="skip torch.save, DCP and DLRover")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}")
    p.add_argument("--child-timeout", type=float, default=0, help="seconds per peer child (default: by size)")
    p.add_argument("--child", choices=("dcp", "dlrover"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--reply-fd", type=int, default=-1, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.quick:
        ns.size_mib, ns.reps, ns.warmup = 64, 3, 2
    if ns.reps < 1 or ns.warmup < 0 or ns.size_mib < 8:
        p.error("need --reps >= 1, --warmup >= 0 and --size-mib >= 8")
    unknown = set(ns.peers.split(",")) - set(PEERS) - {""}
    if unknown:
        p.error(f"unknown peers: {', '.join(sorted(unknown))}")
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    raise_on_signals()
    cleanup = Cleanup()
    try:
        res = run(args, cleanup)
    finally:
        cleanup.run()
    print(table(res), flush=True)
    if args.json:
        print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
