"""Helpers shared by the benchmarks in ``bench/``: a GPT-like training state, shm files, cleanup.

Nothing here is timed. ``gpt_state`` builds the state every save method is measured on (same
seed and shapes in every process, so peers run in subprocesses see identical bytes);
``ShmFile`` is a pre-faulted /dev/shm mapping (the memcpy floor's destination and the O_DIRECT
source); ``Cleanup`` runs registered undo actions in reverse order even after an error or a
SIGTERM/SIGHUP/SIGINT; ``cleaned_up`` is every benchmark parent's prologue (signals raise, the
``Cleanup`` runs when the block ends, however it ends).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ckptd.core.launch import die_with_parent

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
GIB = 2**30
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; Python 3.11's mmap does not name it
ALIGN = 64  # ckptd's tensor alignment inside a shard (ckptd.core.layout.ALIGN_BYTES)

N_LAYER = 6
CTX = 1024
BYTES_PER_PARAM = 2 + 3 * 4  # bf16 model weight + fp32 master weight, exp_avg, exp_avg_sq


@dataclass(frozen=True)
class StateInfo:
    """What ``gpt_state`` built."""

    d_model: int
    vocab: int
    n_layer: int
    n_params: int
    n_tensors: int
    nbytes: int  # sum of tensor bytes (no alignment padding)


def _param_shapes(d: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d)), ("wpe.weight", (CTX, d))]
    for i in range(N_LAYER):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
            (p + "attn.c_attn.weight", (3 * d, d)), (p + "attn.c_attn.bias", (3 * d,)),
            (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
            (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
            (p + "mlp.c_fc.weight", (4 * d, d)), (p + "mlp.c_fc.bias", (4 * d,)),
            (p + "mlp.c_proj.weight", (d, 4 * d)), (p + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def plan_shapes(size_bytes: int) -> tuple[int, int]:
    """(d_model, vocab) so the state totals just under ``size_bytes`` (within 14*d bytes)."""
    per_layer_d2 = 12 * BYTES_PER_PARAM  # 12 d^2 weights per block
    d = int(math.sqrt(0.85 * size_bytes / (N_LAYER * per_layer_d2))) // 64 * 64
    d = max(d, 64)
    fixed = sum(math.prod(s) for n, s in _param_shapes(d, 0) if not n.startswith("wte")) * BYTES_PER_PARAM
    vocab = (size_bytes - fixed) // (BYTES_PER_PARAM * d)
    if vocab < 64:
        raise ValueError(f"--size-mib {size_bytes / MIB:g} is too small for the GPT-like state (try >= 8)")
    return d, int(vocab)


def gpt_state(size_bytes: int, seed: int = 0) -> tuple[dict[str, Any], StateInfo]:
    """A GPT-2-like mixed-precision training state of about ``size_bytes``.

    ``model``: bf16 weights (what the forward pass uses); ``optimizer``: an AdamW-style state
    dict with, per parameter, the fp32 master weight and the fp32 ``exp_avg``/``exp_avg_sq``
    moments (int keys, like ``torch.optim`` produces), plus ``param_groups`` and plain values.
    Six transformer blocks give 76 parameters, so 304 tensors.
    """
    import torch

    d, vocab = plan_shapes(size_bytes)
    gen = torch.Generator().manual_seed(seed)
    model: dict[str, Any] = {}
    opt_state: dict[int, dict[str, Any]] = {}
    nbytes = 0
    shapes = _param_shapes(d, vocab)
    for i, (name, shape) in enumerate(shapes):
        master = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
        exp_avg = torch.empty(shape, dtype=torch.float32).normal_(0.0, 1e-3, generator=gen)
        exp_avg_sq = torch.empty(shape, dtype=torch.float32).uniform_(0.0, 1e-6, generator=gen)
        model[name] = master.to(torch.bfloat16)
        opt_state[i] = {"master": master, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        nbytes += math.prod(shape) * BYTES_PER_PARAM
    state: dict[str, Any] = {
        "model": model,
        "optimizer": {
            "state": opt_state,
            "param_groups": [{
                "lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                "step": 1000, "params": list(range(len(shapes))),
            }],
        },
        "step": 1000,
        "rng_seed": seed,
    }
    info = StateInfo(d, vocab, N_LAYER, len(shapes), 4 * len(shapes), nbytes)
    return state, info


def many_tensors_state(n_tensors: int, elems: int, seed: int = 0) -> tuple[dict[str, Any], StateInfo]:
    """A state of ``n_tensors`` fp32 tensors of ``elems`` elements each, in the shape real states
    with many small tensors have (per-layer norms and biases, MoE experts, per-parameter moments):
    a model dict and an optimizer dict of per-parameter moments, one third each of the tensors
    (the rest in the model), plus plain values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n_params = n_tensors - 2 * (n_tensors // 3)
    model = {f"layer{i // 8}.p{i % 8}": torch.empty(elems).normal_(0.0, 0.02, generator=gen)
             for i in range(n_params)}
    opt_state = {i: {"exp_avg": torch.empty(elems).normal_(0.0, 1e-3, generator=gen),
                     "exp_avg_sq": torch.empty(elems).uniform_(0.0, 1e-6, generator=gen)}
                 for i in range(n_tensors // 3)}
    state = {"model": model, "optimizer": {"state": opt_state, "param_groups": [{"lr": 3e-4, "step": 1000}]},
             "step": 1000}
    return state, StateInfo(0, 0, 0, n_params, n_tensors, n_tensors * elems * 4)


def tensors_of(state: Any) -> list[Any]:
    """Every tensor of a nested state, depth-first in insertion order (dicts, lists, tuples)."""
    import torch

    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    return out


def packed_offsets(tensors: Sequence[Any]) -> tuple[list[int], int]:
    """Offsets of tensors packed back to back at ``ALIGN`` (ckptd's shard layout); total bytes."""
    offsets: list[int] = []
    off = 0
    for t in tensors:
        off = (off + ALIGN - 1) // ALIGN * ALIGN
        offsets.append(off)
        off += t.numel() * t.element_size()
    return offsets, off


def mount_options(path: Path) -> str:
    """The mount options of the filesystem holding ``path`` (its longest mount point in /proc/mounts)."""
    best, opts = "", ""
    target = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and (target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")):
                    if len(fields[1]) >= len(best):
                        best, opts = fields[1], f"{fields[2]} {fields[3]}"
    except OSError:
        pass
    return opts


class ShmFile:
    """A file in /dev/shm, allocated with posix_fallocate, mapped and pre-faulted once."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.capacity = max(capacity, mmap.PAGESIZE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.capacity)
            self.mm = mmap.mmap(fd, self.capacity)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.populated = True
        try:
            self.mm.madvise(MADV_POPULATE_WRITE)
        except OSError:  # kernel < 5.14: touch every page instead
            self.populated = False
            for off in range(0, self.capacity, mmap.PAGESIZE):
                self.mm[off] = 0

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still exported; the unlink below still frees the file
        self.path.unlink(missing_ok=True)


@dataclass
class Cleanup:
    """Undo actions run last-in first-out; each one's failure is reported, not raised."""

    actions: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, what: str, fn: Callable[[], None]) -> None:
        self.actions.append((what, fn))

    def run(self) -> None:
        while self.actions:
            what, fn = self.actions.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up the rest
                print(f"cleanup: {what} failed: {exc}", file=sys.stderr)


@contextlib.contextmanager
def cleaned_up() -> Iterator[Cleanup]:
    """A benchmark parent's run: SIGTERM/SIGHUP raise, and the yielded Cleanup runs at the end."""
    raise_on_signals()
    cleanup = Cleanup()
    try:
        yield cleanup
    finally:
        cleanup.run()


def raise_on_signals() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks (cleanup) run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def gib_per_s(nbytes: int, seconds: float | None) -> float | None:
    if not seconds or seconds <= 0:
        return None
    return nbytes / GIB / seconds


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


class ServeProcess:
    """``ckptd serve`` (``args`` after the module) as a subprocess in its own session, its output
    in ``log_path``; ``start`` waits until it serves, ``stop`` sends SIGTERM, then SIGKILLs its
    group after ``stop_wait_s``. The daemons of bench/stall.py and bench/object.py build on it."""

    def __init__(self, name: str, socket: Path, log_path: Path, serve_args: list[str]) -> None:
        self.name, self.socket, self.log_path = name, socket, log_path
        self.args = [sys.executable, "-m", "ckptd.daemon.cli", "serve", "--socket", str(socket), *serve_args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> None:
        from ckptd_client.rpc import wait_until_serving

        from ckptd.core.errors import DaemonUnavailable

        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(die_with_parent(self.args), stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)
        try:
            wait_until_serving(self.socket, timeout_s, exit_code=self.proc.poll)
        except DaemonUnavailable as exc:
            raise RuntimeError(f"ckptd {self.name}: {exc}:\n{self.log_tail()}") from None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_messages(self) -> list[tuple[str, float | None]]:
        """(msg, ts) of each line of the daemon's log: JSON lines parsed, any other line as is
        with no time; empty when the log cannot be read."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out: list[tuple[str, float | None]] = []
        for line in lines:
            try:
                rec = json.loads(line)
                out.append((str(rec.get("msg", "")), float(rec["ts"]) if "ts" in rec else None))
            except (ValueError, KeyError, TypeError, AttributeError):
                out.append((line, None))
        return out

    def stop(self, stop_wait_s: float = 60) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(stop_wait_s)
        except subprocess.TimeoutExpired:
            print(f"ckptd {self.name} did not stop within {stop_wait_s:.0f}s of SIGTERM; killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)

