"""Helpers shared by the test modules that start their own (module-scoped) ckptd daemons.

``running_daemon`` starts a real ``ckptd serve`` subprocess on a short Unix socket path with a
private root and /dev/shm directory, waits until it answers, and on exit kills it and removes its
shm directory. Tests that need a fresh daemon per test use conftest's ``daemon_factory`` instead.
Both start daemons through ``die_with_parent(args)``: a daemon dies with the test
process, even one killed with SIGKILL. ``run_rank_processes`` runs one worker process per rank
(test_dcp.py, test_multirank.py, the framework examples' tests) and collects their JSON reports;
``peer_config`` writes the ckptd.toml of a one-node daemon with its peer port open (the hostile,
property and security tests), ``running_peer_daemon`` runs one; ``replica_round_trip`` pushes a
replica to a peer port and fetches it back.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd_client.rpc import wait_until_serving

from ckptd.core.errors import DaemonUnavailable
from ckptd.core.launch import die_with_parent

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for daemons' peer and metrics ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peer_nodes(factory: Any, names: Sequence[str], token: str, extra: str = "",
               env: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """One daemon per name from conftest's ``daemon_factory``, each with a peer port on loopback and
    the others as its static peers (``[peers]`` plus ``extra`` lines, e.g. "push_timeout_s = 1.0");
    ``env``: per name, CKPTD_* variables of that daemon."""
    ports = {n: free_port() for n in names}
    peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
    return {n: factory(env=dict((env or {}).get(n, {})), config_text=(
        f'[peers]\nlisten = "127.0.0.1:{ports[n]}"\nnode_id = "{n}"\ntoken = "{token}"\npeers = "{peers}"\n'
        f"replication_factor = 1\n{extra}")) for n in names}


def log_messages(log_text: str) -> list[str]:
    """The ``msg`` of every JSON log line of a daemon's log (other lines skipped)."""
    out = []
    for line in log_text.splitlines():
        try:
            out.append(str(json.loads(line)["msg"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without CKPTD_* variables (so the host cannot change a test's config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    env.update(extra or {})
    return env


@dataclass
class Daemon:
    root: Path
    shm_dir: Path
    socket: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def addr(self) -> str:
        return str(self.socket)

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def data_dir(self) -> Path:
        """The disk tier's root inside the daemon root."""
        return self.root / "data"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def _wait_ready(d: Daemon, timeout_s: float = 30) -> None:
    try:
        wait_until_serving(d.socket, timeout_s, exit_code=d.proc.poll)
    except DaemonUnavailable as exc:
        raise RuntimeError(f"{exc}:\n{d.log()}") from None


@contextmanager
def running_daemon(
    workdir: Path,
    *,
    budget: str = "512MiB",
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    root: Path | None = None,
) -> Iterator[Daemon]:
    """Start ``ckptd serve`` under workdir; kill it and remove its shm dir on exit."""
    root = root or workdir / f"root-{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True, exist_ok=True)
    shm_dir = Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:10]}"
    sock_dir = Path(tempfile.mkdtemp(prefix="ckt-", dir="/tmp"))
    socket = sock_dir / "d.sock"
    log_path = workdir / f"daemon-{uuid.uuid4().hex[:6]}.log"
    args = [PYTHON, "-m", "ckptd.daemon.cli", "serve", "--root", str(root), "--socket", str(socket),
            "--shm-dir", str(shm_dir), "--budget-bytes", budget, *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(die_with_parent(args), stdout=log, stderr=subprocess.STDOUT, env=clean_env(env))
    d = Daemon(root, shm_dir, socket, proc, log_path)
    try:
        _wait_ready(d)
        yield d
    finally:
        d.kill()
        shutil.rmtree(shm_dir, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


def peer_config(work: Path, port: int, token: str, push_timeout_s: float = 5.0, **memory: str | float | int) -> Path:
    """work/ckptd.toml: [memory] with 64 KiB chunks (plus ``memory``'s keys) and [peers] listening on
    127.0.0.1:port as node "n1" with the given token."""
    mem = {"chunk_bytes": "64KiB", **memory}
    lines = ["[memory]", *(f"{k} = {json.dumps(v)}" for k, v in mem.items()),
             "[peers]", f'listen = "127.0.0.1:{port}"', 'node_id = "n1"', f"token = {json.dumps(token)}",
             f"push_timeout_s = {push_timeout_s}"]
    cfg = work / "ckptd.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


@contextmanager
def running_peer_daemon(work: Path, token: str, push_timeout_s: float = 5.0,
                        **memory: str | float | int) -> Iterator[tuple[Daemon, int]]:
    """``running_daemon`` (64 MiB budget) with ``peer_config``'s peer port open: (daemon, peer port)."""
    port = free_port()
    cfg = peer_config(work, port, token, push_timeout_s, **memory)
    with running_daemon(work, budget="64MiB", extra_args=["--config", str(cfg)]) as d:
        yield d, port


def replica_round_trip(target: str, token: str, header: Any, data: bytes, bulk: bool = False) -> bytes:
    """Push data to the peer port at target as the ReplicaHeader names it, fetch it back (same job,
    step, rank) and return what came back; the PeerClient is node "n2"."""
    from ckptd.peers.client import PeerClient

    async def round_trip() -> bytes:
        client = PeerClient(token, "n2", bulk=bulk)
        try:
            await client.push(target, header, memoryview(data), 10)
            out = bytearray(len(data))
            await client.fetch_into(target, header.job, header.step, header.entry.rank, memoryview(out), 10)
            return bytes(out)
        finally:
            await client.close()

    return asyncio.run(round_trip())


def unique_job(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def tensor_bytes(t: Any) -> bytes:
    """The raw bytes of a torch tensor in logical (row-major) order, whatever its strides."""
    import torch

    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def run_rank_processes(cmds: Sequence[Sequence[str]], timeout_s: float,
                       envs: Sequence[dict[str, str]] | None = None, check: bool = True) -> list[dict[str, Any]]:
    """Start one process per rank (all at once: they meet in collectives; ``envs[rank]`` or
    ``clean_env()`` as environment), wait for each, and return each one's last stdout line as JSON
    plus its ``returncode``, in rank order. A rank that prints nothing (or, with ``check``, exits
    non-zero) fails the test with its output; whatever is still running then is killed."""
    procs = [subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=envs[rank] if envs is not None else clean_env(), cwd=REPO)
             for rank, cmd in enumerate(cmds)]
    reports = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout_s)
            lines = out.strip().splitlines()
            assert lines and (proc.returncode == 0 or not check), \
                f"rank {rank} exited {proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
            reports.append({"returncode": proc.returncode, **json.loads(lines[-1])})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return reports
