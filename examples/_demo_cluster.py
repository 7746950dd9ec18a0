"""The demo's ckptd daemons: one per node, started, lost, replaced and stopped.

``Daemon`` is one ``ckptd serve`` subprocess with its own socket and private shm directory.
``make_daemons`` lays out the run: one daemon on the root, or with ``--nodes 2`` one per node
(``ROOT/n1``, ``ROOT/n2``) with a ``[peers]`` config so that each replicates to the other.
``lose_node`` plays the loss of node n2 and starts its empty replacement; ``stop_all`` stops
every daemon the run ever started.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _demo_util import DemoError, free_port, say, tail

from ckptd.core.launch import die_with_parent

DAEMON_START_TIMEOUT_S = 30.0
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; leave room
NODE_NAMES = ("n1", "n2")
LOST_NODE = "n2"


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
        cmd = [str(ckptd)] if ckptd.exists() else [sys.executable, "-m", "ckptd.daemon.cli"]
        cmd += ["serve", "--root", str(self.root), "--socket", str(self.socket),
                "--shm-dir", str(self.shm_dir), "--budget-bytes", "1GiB"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(die_with_parent(cmd, signal.SIGTERM), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

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


def lose_node(daemons: list[Daemon], every_daemon: list[Daemon], scratch: Path) -> str:
    """Node ``LOST_NODE`` is lost, and a fresh daemon (same config, nothing in it) takes its place.

    The replacement goes into ``daemons`` in the lost one's place and is appended to
    ``every_daemon`` (the run's clean-up list) before it starts. Returns the lost node's name.
    """
    i = NODE_NAMES.index(LOST_NODE)
    lost = daemons[i]
    lost.lose()
    say(f"node {LOST_NODE} lost: SIGKILLed its daemon, deleted its root {lost.root} and shm {lost.shm_dir}")
    replacement = lost.fresh(scratch / f"ckptd-{LOST_NODE}-replacement.log")
    daemons[i] = replacement
    every_daemon.append(replacement)
    lost.name = f"{lost.name} (lost)"
    replacement.spawn()
    replacement.wait_ready()
    say(f"a fresh {replacement.name} is serving (pid {replacement.proc.pid if replacement.proc else '?'}; "
        "same config, empty root and shm)")
    return LOST_NODE


def stop_all(every_daemon: list[Daemon], sock_dirs: list[Path]) -> None:
    """Stop every daemon of the run, a lost node's replacement first (they share the shm path)."""
    for d in reversed(every_daemon):
        try:
            rc = d.stop()
        except (OSError, subprocess.SubprocessError) as exc:  # keep going: every other daemon still has to stop
            say(f"{d.name} did not stop cleanly: {exc!r}")
            continue
        say(f"{d.name} stopped (exit code {rc})")
    for sock_dir in sock_dirs:
        shutil.rmtree(sock_dir, ignore_errors=True)
