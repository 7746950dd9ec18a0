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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
DAEMON_START_TIMEOUT_S = 30.0
PHASE_TIMEOUT_S = 180.0
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; leave room


class DemoError(RuntimeError):
    """The demo could not run to the end (a process failed or timed out)."""


_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[demo {time.monotonic() - _T0:5.1f}s] {msg}", flush=True)


def _die_with_parent(sig: int) -> None:
    """In a child before exec: ask Linux to send ``sig`` when the demo dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the daemon --------------------------------------------------------------------------------
@dataclass
class Daemon:
    """One ``ckptd serve`` subprocess with its own socket and private shm directory."""

    root: Path
    socket: Path
    shm_dir: Path
    log_path: Path
    config: Path | None = None  # a TOML config file (the [peers] section of a multi-node run)
    name: str = "ckptd"
    proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        ckptd = Path(sys.executable).with_name("ckptd")
        cmd = [str(ckptd)] if ckptd.exists() else [sys.executable, "-m", "ckptd.cli"]
        cmd += ["serve", "--root", str(self.root), "--socket", str(self.socket),
                "--shm-dir", str(self.shm_dir), "--budget-bytes", "1GiB"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=lambda: _die_with_parent(signal.SIGTERM))

    def wait_ready(self, timeout_s: float = DAEMON_START_TIMEOUT_S) -> None:
        """Wait until the daemon accepts connections on its socket (it listens once it serves).

        A bare connect, not a gRPC call: this process forks the trainers and must not hold a gRPC
        channel when it does. Each trainer's CheckpointManager then waits for the channel itself.
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"ckptd exited with code {self.proc.returncode}:\n{tail(self.log_path)}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.socket))
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise DemoError(f"ckptd did not answer within {timeout_s:.0f}s:\n{tail(self.log_path)}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def lose(self) -> None:
        """The node is lost: SIGKILL the daemon, then delete its root (disk tier) and shm (RAM)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.shm_dir, ignore_errors=True)

    def fresh(self, log_path: Path) -> Daemon:
        """A new daemon for the same node (same config, socket, root and shm paths), not started."""
        return Daemon(self.root, self.socket, self.shm_dir, log_path, self.config, self.name)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), wait, SIGKILL if it hangs; then remove the shm directory."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                say(f"ckptd did not stop within {timeout_s:.0f}s of SIGTERM; killing it")
                self.proc.kill()
                rc = self.proc.wait()
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        return rc


# -- the trainers ------------------------------------------------------------------------------
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
    _die_with_parent(signal.SIGKILL)
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


# -- the run -----------------------------------------------------------------------------------
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


def compare(ref: list[dict[str, Any]], run: list[dict[str, Any]], key: str) -> tuple[bool, list[str]]:
    """Whether every rank's tensors under ``key`` hash the same in both runs; names that differ."""
    diffs = []
    for r, (a, b) in enumerate(zip(ref, run)):
        if a[key].keys() != b[key].keys():
            diffs.append(f"rank {r}: different {key} tensors")
            continue
        diffs += [f"rank {r}: {name}" for name in a[key] if a[key][name] != b[key][name]]
    return not diffs, diffs


NODE_NAMES = ("n1", "n2")
LOST_NODE = "n2"


def socket_path(base: Path, sock_dirs: list[Path]) -> Path:
    """``base/run/ckptd.sock``, or one in a fresh short /tmp directory when that path is too long."""
    sock = base / "run" / "ckptd.sock"
    if len(str(sock)) > MAX_SOCKET_PATH:
        sock_dirs.append(Path(tempfile.mkdtemp(prefix="ckptd-demo-", dir="/tmp")))
        sock = sock_dirs[-1] / "ckptd.sock"
    return sock


def peers_config(node: str, ports: dict[str, int], token: str) -> str:
    """The TOML config of one node of a multi-node run: only its ``[peers]`` section."""
    peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
    return (f'[peers]\nlisten = "127.0.0.1:{ports[node]}"\nnode_id = "{node}"\ntoken = "{token}"\n'
            f'peers = "{peers}"\nreplication_factor = 1\n')


def make_daemons(args: argparse.Namespace, root: Path, scratch: Path, run_id: str,
                 sock_dirs: list[Path]) -> tuple[list[Daemon], list[list[int]]]:
    """The daemons of the run (one per node) and, per node, the ranks it serves.

    One node: one daemon on ``root`` itself, serving every rank. Several: node ``n<i>`` gets its
    own root ``root/n<i>``, socket, private shm directory and a ``[peers]`` section (loopback
    peer ports, one random token, replication factor 1), and serves a contiguous block of ranks.
    """
    if args.nodes == 1:
        sock = socket_path(root, sock_dirs)
        return ([Daemon(root, sock, Path("/dev/shm") / f"ckptd-demo-{run_id}", scratch / "ckptd.log")],
                [list(range(args.world_size))])
    names = NODE_NAMES[: args.nodes]
    ports = {n: free_port() for n in names}
    token = secrets.token_hex(16)
    per_node = args.world_size // args.nodes
    daemons = []
    for n in names:
        config = scratch / f"ckptd-{n}.toml"
        config.write_text(peers_config(n, ports, token))
        daemons.append(Daemon(root / n, socket_path(root / n, sock_dirs),
                              Path("/dev/shm") / f"ckptd-demo-{run_id}-{n}", scratch / f"ckptd-{n}.log",
                              config=config, name=f"ckptd {n}"))
    return daemons, [list(range(i * per_node, (i + 1) * per_node)) for i in range(args.nodes)]


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

        lost_node = None
        if multi:
            i = NODE_NAMES.index(LOST_NODE)
            lost = daemons[i]
            lost.lose()
            lost_node = LOST_NODE
            say(f"node {LOST_NODE} lost: SIGKILLed its daemon, deleted its root {lost.root} and shm {lost.shm_dir}")
            replacement = lost.fresh(scratch / f"ckptd-{LOST_NODE}-replacement.log")
            daemons[i] = replacement
            every_daemon.append(replacement)
            lost.name = f"{lost.name} (lost)"
            replacement.spawn()
            replacement.wait_ready()
            say(f"a fresh {replacement.name} is serving (pid {replacement.proc.pid if replacement.proc else '?'}; "
                "same config, empty root and shm)")

        say("run 1, restarted: the same trainers restore from the newest committed step and finish")
        second = Trainers("resumed", scratch / "resumed", args.world_size)
        launches.append(second)
        second.start(ckpt, per_rank())
        second.wait(report_every=10)
        resumed = second.results()
        restores = [r["restored"] for r in resumed]
        if any(r is None for r in restores):
            raise DemoError("the restarted trainers found no checkpoint to restore")
        restored_steps = {r["step"] for r in restores}
        if len(restored_steps) != 1:
            raise DemoError(f"ranks restored different steps: {sorted(restored_steps)}")
        restored_step = restored_steps.pop()
        per_rank_tiers = [r["served_from"] for r in restores]
        tiers = sorted(set(per_rank_tiers))
        restore_ms = [round(r["seconds"] * 1000, 3) for r in restores]
        say(f"restored step {restored_step} from {'/'.join(tiers)} in {max(restore_ms):.1f} ms "
            f"(per rank: {restore_ms}; tier per rank: {per_rank_tiers})")

        say("run 2: the same job, uninterrupted, without ckptd (the reference)")
        ref = Trainers("reference", scratch / "reference", args.world_size)
        launches.append(ref)
        ref.start(common)
        ref.wait()
        reference = ref.results()

        weights_ok, weight_diffs = compare(reference, resumed, "weights")
        optim_ok, optim_diffs = compare(reference, resumed, "optimizer")
        ranks_agree = all(r["weights"] == resumed[0]["weights"] for r in resumed)
        for diff in (weight_diffs + optim_diffs)[:10]:
            say(f"  differs: {diff}")
        n_tensors = sum(len(r["weights"]) + len(r["optimizer"]) for r in resumed)
        say(f"compared {n_tensors} tensors (weights + optimizer state, all ranks): "
            f"{'bit-identical' if weights_ok and optim_ok else 'DIFFERENT'}")

        stalls = [e["stall_s"] for t in (first, second) for entries in t.progress() for e in entries
                  if e.get("stall_s") is not None]
        return {
            "steps_lost": completed - restored_step,
            "identical": weights_ok and optim_ok,
            "stall_ms_median": round(statistics.median(stalls) * 1000, 3) if stalls else None,
            "restore_ms": max(restore_ms),
            "restored_from": tiers[0] if len(tiers) == 1 else "+".join(tiers),
            "restored_from_per_rank": per_rank_tiers,
            "nodes": args.nodes,
            "lost_node": lost_node,
            "steps": args.steps,
            "world_size": args.world_size,
            "kill_at": args.kill_at,
            "completed_before_kill": completed,
            "restored_step": restored_step,
            "bytes_per_rank": max(r["bytes"] for r in resumed),
            "saves": len(stalls),
            "restore_ms_per_rank": restore_ms,
            "weights_identical": weights_ok,
            "optimizer_identical": optim_ok,
            "ranks_agree": ranks_agree,
            "final_loss": resumed[0]["final_loss"],
            "local_durable_step": min((r["local_durable_step"] or -1) for r in resumed),
            "seed": args.seed,
            "job": job,
            "seconds": round(time.monotonic() - t_start, 1),
        }
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
        for d in reversed(every_daemon):  # a lost node's replacement first: they share the shm path
            try:
                rc = d.stop()
            except (OSError, subprocess.SubprocessError) as exc:  # keep going: every other daemon still has to stop
                say(f"{d.name} did not stop cleanly: {exc!r}")
                continue
            say(f"{d.name} stopped (exit code {rc})")
        for sock_dir in sock_dirs:
            shutil.rmtree(sock_dir, ignore_errors=True)


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
