"""The demo's trainers: ``world_size`` processes of ``demo_trainer.main``, forked from the demo.

``preload_trainer`` imports torch and the trainer once so that every forked trainer starts warm;
``Trainers`` is one launch (its processes, logs and the progress files each rank appends to after
every save that returned); ``kill_after`` SIGKILLs a launch once every rank saved a given step.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from _demo_util import DemoError, die_with_parent, free_port, say, tail

HERE = Path(__file__).resolve().parent
PHASE_TIMEOUT_S = 180.0


def preload_trainer() -> None:
    """Import torch and the trainer once, here, so that every forked trainer starts warm.

    Each trainer is still a fresh process running ``demo_trainer.main`` from the top (its
    model, optimizer, process group and CheckpointManager are built in the child); forking only
    spares each of them the ~4 s of CPU that importing torch (and torch._dynamo, pulled in by
    the first optimizer) costs, which is most of this demo's run time on a small machine.
    This process never opens a gRPC channel, so nothing of grpc is inherited half-initialised.
    """
    os.environ["OMP_NUM_THREADS"] = "1"
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import demo_trainer  # noqa: F401  (imports torch)
    import torch

    torch.set_num_threads(1)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # imports torch._dynamo


def _trainer_process(argv: list[str], log_path: str) -> None:
    """Body of a forked trainer: default signals, output to its log, then ``demo_trainer.main``."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent(signal.SIGKILL)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import demo_trainer

    sys.exit(demo_trainer.main(argv))


@dataclass
class Trainers:
    """``world_size`` trainer processes of one launch, with their logs and side-channel files."""

    name: str
    workdir: Path
    world_size: int
    procs: list[BaseProcess] = field(default_factory=list)

    def log_path(self, rank: int) -> Path:
        return self.workdir / f"{self.name}-rank{rank}.log"

    def start(self, common: Sequence[str], per_rank: Sequence[Sequence[str]] | None = None) -> None:
        """Fork every rank with ``common`` arguments, plus ``per_rank[rank]`` when given."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        ctx = multiprocessing.get_context("fork")
        for rank in range(self.world_size):
            argv = ["--rank", str(rank), "--world-size", str(self.world_size), "--port", str(port),
                    "--workdir", str(self.workdir), *common, *(per_rank[rank] if per_rank else ())]
            proc = ctx.Process(target=_trainer_process, args=(argv, str(self.log_path(rank))),
                               name=f"{self.name}-rank{rank}", daemon=True)
            proc.start()
            self.procs.append(proc)

    def progress(self) -> list[list[dict[str, Any]]]:
        """Per rank, the complete lines of its progress file (a torn last line is ignored)."""
        out: list[list[dict[str, Any]]] = []
        for rank in range(self.world_size):
            entries: list[dict[str, Any]] = []
            path = self.workdir / f"progress-rank{rank}.jsonl"
            with contextlib.suppress(FileNotFoundError):
                for line in path.read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        entries.append(json.loads(line))
            out.append(entries)
        return out

    def last_steps(self) -> list[int]:
        return [max((e["step"] for e in entries), default=0) for entries in self.progress()]

    def check_alive(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.exitcode is not None:
                raise DemoError(f"{self.name}: rank {rank} exited early with code {p.exitcode}:\n"
                                f"{tail(self.log_path(rank))}")

    def wait(self, timeout_s: float = PHASE_TIMEOUT_S, report_every: int = 0) -> None:
        """Wait for every rank to exit 0, printing rank 0's loss every ``report_every`` steps."""
        deadline = time.monotonic() + timeout_s
        reported = 0
        while any(p.exitcode is None for p in self.procs):
            if time.monotonic() > deadline:
                raise DemoError(f"{self.name}: trainers still running after {timeout_s:.0f}s")
            reported = self.report(reported, report_every)
            time.sleep(0.05)
        self.report(reported, report_every)
        for rank, p in enumerate(self.procs):
            if p.exitcode != 0:
                raise DemoError(f"{self.name}: rank {rank} failed with code {p.exitcode}:\n"
                                f"{tail(self.log_path(rank))}")

    def report(self, reported: int, every: int) -> int:
        if every <= 0:
            return reported
        for e in self.progress()[0]:
            if e["step"] > reported and e["step"] % every == 0:
                stall = f", save stall {e['stall_s'] * 1000:.2f} ms" if e.get("stall_s") is not None else ""
                say(f"  {self.name}: step {e['step']:3d}  loss {e['loss']:.4f}{stall}")
                reported = e["step"]
        return reported

    def kill(self) -> None:
        """SIGKILL every rank still running and reap it."""
        for p in self.procs:
            if p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join(10)

    def results(self) -> list[dict[str, Any]]:
        return [json.loads((self.workdir / f"result-rank{r}.json").read_text()) for r in range(self.world_size)]


def kill_after(trainers: Trainers, step: int, poll_s: float, timeout_s: float = PHASE_TIMEOUT_S) -> None:
    """Once every rank reported step ``step``'s save returned, SIGKILL them all."""
    deadline = time.monotonic() + timeout_s
    reported = 0
    while min(trainers.last_steps()) < step:
        trainers.check_alive()
        if time.monotonic() > deadline:
            raise DemoError(f"{trainers.name}: step {step} not saved on every rank after {timeout_s:.0f}s")
        reported = trainers.report(reported, 10)
        time.sleep(poll_s)
    trainers.kill()
