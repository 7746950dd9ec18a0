"""ckptd demo: train, SIGKILL the trainers mid-run, resume from the daemon's memory, compare.

What it demonstrates, end to end on one machine (CPU only, 15-20 s on two cores):

1. One ``ckptd serve`` daemon starts on ``--root`` with its own socket and a private
   ``/dev/shm`` directory.
2. A small causal transformer trains on synthetic data as ``--world-size`` separate processes
   (torch.distributed, gloo on 127.0.0.1; AdamW, warmup + cosine LR, dropout), saving its full
   state (model, optimizer, scheduler, RNG) through ``CheckpointManager.save`` after *every*
   step. ``save`` returns once this rank's bytes are in the daemon's shared memory; that blocking
   time is the only cost training pays, and the demo reports its median.
3. Once step ``--kill-at``'s save has returned on every rank, while step ``--kill-at + 1`` is
   being computed, the demo SIGKILLs every trainer process: no clean-up, no flush, no goodbye.
4. It starts the trainers again. They run the same code as at the first start:
   ``CheckpointManager.restore(state)`` fills the state in place from the newest committed step,
   which the daemon (still alive) serves from its memory tier, and training finishes.
5. It runs the same job once more without any interruption and without ckptd, and compares the
   final weights and optimizer state of every rank bit for bit (sha256 of every tensor).

The last line of output is one JSON object: ``steps_lost`` (highest step completed on all ranks
before the kill minus the step the restore returned: steps training has to redo),
``identical``, ``stall_ms_median``, ``restore_ms``, ``restored_from`` (the tiers the ranks
restored from, joined with "+"), ``restored_from_per_rank`` and some context. The exit
code is 0 only if the resumed run is bit-identical and no step was lost.

The training side lives in ``examples/demo_trainer.py``; this file orchestrates processes. It
imports torch once and forks every trainer from itself (fresh processes that build everything
from scratch, but skip re-importing torch), and it never talks gRPC itself. Each rank appends a
line to a progress file after every save that returned; the demo polls those files to know when
to kill, and to count what was completed before the kill.

Two nodes (``--nodes 2``): two daemons stand for two nodes on loopback, each with its own root
(``ROOT/n1``, ``ROOT/n2``), socket, private shm directory and a ``[peers]`` section (free loopback
ports, a random token, replication factor 1). Node n1 serves the first half of the ranks, n2 the
second; the trainers pass ``--node-ranks``. Each rank reports step ``--kill-at`` only once it is
REPLICATED (its node's shards are on the other node). At the kill, node n2 is lost too: its
daemon is SIGKILLed and its root and shm directory deleted; a fresh n2 daemon starts with the same
config and nothing in it. On the restart n1's ranks restore from memory, n2's from their replica
on n1 ("peer"). The JSON line then also says ``nodes``, ``lost_node`` and
``restored_from_per_rank``.

Usage: ``python examples/demo.py [--root DIR] [--steps 60] [--kill-at N] [--seed 0]
[--world-size 2] [--nodes 1|2] [--keep] [--no-hold]``. ``--no-hold`` kills the trainers wherever they happen
to be when the demo notices step N was saved (possibly in the middle of a later save) instead of
making them linger inside step N+1.

This file is the command line and the run; beside it, ``_demo_cluster`` starts, loses and stops
the daemons, ``_demo_trainers`` forks and watches the trainers, ``_demo_report`` checks the
restore, compares the runs and builds the JSON line, and ``_demo_util`` holds what they share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from _demo_cluster import lose_node, make_daemons, stop_all
from _demo_report import compare_runs, restore_of, summary
from _demo_trainers import Trainers, kill_after, preload_trainer
from _demo_util import DemoError, say, tail


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    job = f"demo-{run_id}"
    scratch = root / f".demo-{run_id}"  # not a valid job name, so the daemon leaves it alone
    scratch.mkdir(parents=True)
    sock_dirs: list[Path] = []
    daemons, node_ranks = make_daemons(args, root, scratch, run_id, sock_dirs)
    every_daemon = list(daemons)  # every daemon ever started (a lost node's too), for clean-up
    multi = args.nodes > 1
    node_of = {rank: i for i, ranks in enumerate(node_ranks) for rank in ranks}
    launches: list[Trainers] = []
    t_start = time.monotonic()
    try:
        for d in daemons:
            say(f"starting {d.name} on {d.root} (socket {d.socket}, shm {d.shm_dir})")
            d.spawn()
        preload_trainer()  # while the daemons start
        for d in daemons:
            d.wait_ready()
        pids = ", ".join(str(d.proc.pid if d.proc else "?") for d in daemons)
        say(f"ckptd is serving ({'pids' if multi else 'pid'} {pids}); torch loaded")

        common = ["--steps", str(args.steps), "--seed", str(args.seed)]
        ckpt = [*common, "--job", job]

        def per_rank() -> list[list[str]]:
            """Each rank's daemon socket (and, with several nodes, the ranks of its node)."""
            out = []
            for rank in range(args.world_size):
                i = node_of[rank]
                extra = ["--socket", str(daemons[i].socket)]
                if multi:
                    extra += ["--node-ranks", ",".join(map(str, node_ranks[i]))]
                out.append(extra)
            return out

        where_saved = "replicated to a peer" if multi else "saved everywhere"
        say(f"run 1: {args.world_size} ranks on {args.nodes} node(s), {args.steps} steps, a save every step; "
            f"SIGKILL once step {args.kill_at} is {where_saved}")
        first = Trainers("run1", scratch / "run1", args.world_size)
        launches.append(first)
        run1 = [*ckpt] if args.no_hold else [*ckpt, "--hold-after", str(args.kill_at)]
        if multi:  # the rank reports step kill_at only once its node's shards are on a peer
            run1 += ["--wait-replicated-at", str(args.kill_at)]
        first.start(run1, per_rank())
        kill_after(first, args.kill_at, poll_s=0.001 if args.no_hold else 0.02)
        last = first.last_steps()
        completed = min(last)
        where = "" if args.no_hold else f" in the middle of step {args.kill_at + 1}"
        say(f"SIGKILLed every rank{where} (last save returned per rank: {last}; on all ranks: {completed})")
        for d in daemons:
            if not d.alive():
                raise DemoError(f"{d.name} died with the trainers:\n{tail(d.log_path)}")

        lost_node = lose_node(daemons, every_daemon, scratch) if multi else None

        say("run 1, restarted: the same trainers restore from the newest committed step and finish")
        second = Trainers("resumed", scratch / "resumed", args.world_size)
        launches.append(second)
        second.start(ckpt, per_rank())
        second.wait(report_every=10)
        resumed = second.results()
        restore = restore_of(resumed)

        say("run 2: the same job, uninterrupted, without ckptd (the reference)")
        ref = Trainers("reference", scratch / "reference", args.world_size)
        launches.append(ref)
        ref.start(common)
        ref.wait()
        reference = ref.results()

        comparison = compare_runs(reference, resumed)

        stalls = [e["stall_s"] for t in (first, second) for entries in t.progress() for e in entries
                  if e.get("stall_s") is not None]
        return summary(args, job, completed, lost_node, stalls, restore, comparison, resumed,
                       time.monotonic() - t_start)
    except BaseException:
        for t in launches:
            for rank in range(t.world_size):
                print(f"--- {t.name} rank {rank} log (tail) ---\n{tail(t.log_path(rank))}", file=sys.stderr)
        for d in every_daemon:
            print(f"--- {d.name} log {d.log_path.name} (tail) ---\n{tail(d.log_path)}", file=sys.stderr)
        raise
    finally:
        for t in launches:
            t.kill()
        stop_all(every_daemon, sock_dirs)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so that clean-up runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="directory for all daemon data (default: a fresh temp dir)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--kill-at", type=int, help="SIGKILL the trainers after this step's save (default steps/2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-size", type=int, default=2, help="trainer processes (default 2)")
    p.add_argument("--nodes", type=int, default=1, choices=(1, 2),
                   help="daemons standing for nodes (default 1); with 2, node n2 is lost at the kill "
                        "and its ranks restore from their replicas on n1")
    p.add_argument("--no-hold", action="store_true",
                   help="do not make the trainers linger in step kill-at+1: kill them wherever they are "
                        "when the demo notices (possibly in the middle of a later save)")
    p.add_argument("--keep", action="store_true", help="keep the temp root (a given --root is always kept)")
    args = p.parse_args(argv)
    if args.kill_at is None:
        args.kill_at = args.steps // 2
    if args.steps < 2 or not 1 <= args.kill_at < args.steps:
        p.error("need --steps >= 2 and 1 <= --kill-at < --steps")
    if not 1 <= args.world_size <= 8:
        p.error("--world-size must be in [1, 8]")
    if args.world_size % args.nodes:
        p.error("--world-size must be a multiple of --nodes")
    if args.nodes > 1 and args.no_hold:
        p.error("--no-hold needs --nodes 1 (a later step, saved but not yet replicated, would split the restore)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    temp_root = args.root is None
    root: Path = Path(tempfile.mkdtemp(prefix="ckptd-demo-")) if temp_root else args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any]
    try:
        with signals_as_exceptions():
            summary = run(args, root)
    except (RuntimeError, OSError, ValueError, KeyError, ImportError, subprocess.SubprocessError) as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        say(f"FAILED: {exc.__class__.__name__}: {first_line} (logs above, on stderr)")
        summary = {"steps_lost": None, "identical": False, "error": f"{exc.__class__.__name__}: {first_line}"}
    finally:
        if temp_root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            say(f"daemon data kept in {root}")
    ok = summary["identical"] is True and summary["steps_lost"] == 0
    say("PASS: resumed run is bit-identical, no step lost" if ok else "FAIL")
    print(json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
