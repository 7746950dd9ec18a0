"""The world the fault scenarios run in: real ckptd daemons, an S3 endpoint, fault proxies.

``Env`` is shared by every scenario run of a session (pytest module or the command-line runner):
it starts one moto S3 server on first use (one bucket, one key prefix per Env), hands out fault
proxies in front of it, keeps one empty "reader" node that restores from the store, and kills and
removes everything it started at ``close``. ``Node`` is one daemon (one "node"): its own root,
shm directory, socket and config; it can be killed, stopped, restarted on what survived, wiped.
Daemons run as subprocesses of this process, with no CKPTD_* variable of the host.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests._ckptd_helpers import clean_env, free_port
from tests.conftest import wait_for_daemon
from tests.fault.invariants import Store
from tests.tiers._moto import ACCESS_KEY_ID, BUCKET, SECRET_ACCESS_KEY
from tests.tiers.faultproxy import FaultProxy

REPO = Path(__file__).resolve().parents[3]
MiB = 2**20
BUDGET = 96 * MiB
SLOTS_PER_RANK = 3
WAIT_TIMEOUT_S = 5.0  # memory.wait_timeout_s of every daemon and client: the back-pressure bound
SAVE_DEADLINE_S = WAIT_TIMEOUT_S + 5.0  # a save() may block at most this long (grace for a busy host)
TOKEN = "fault-scenarios-peer-token-0123"
AWS_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent/ckptd-fault-aws-config",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/ckptd-fault-aws-credentials",
           "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def toml(sections: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "".join(f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in items.items())
                   for name, items in sections.items() if items)


def base_config() -> dict[str, dict[str, Any]]:
    return {"memory": {"chunk_bytes": "64KiB", "wait_timeout_s": WAIT_TIMEOUT_S, "lease_timeout_s": 120.0,
                       "slots_per_rank": SLOTS_PER_RANK},
            "daemon": {"shutdown_timeout_s": 10.0}}


@dataclass
class Node:
    """One ckptd daemon standing for one node of the job."""

    name: str
    env: Env
    config: dict[str, dict[str, Any]]
    ranks: tuple[int, ...] = ()  # ranks this node serves; () = all (a one-node job)
    faults: dict[str, str] = field(default_factory=dict)  # extra env (failpoints, fault wrapper)
    wrapper: bool = False  # start through tests/fault/scenarios/_faultwrap.py
    root: Path = Path()
    shm_dir: Path = Path()
    addr: str = ""
    log_path: Path = Path()
    proc: subprocess.Popen[bytes] | None = None
    budget_bytes: int = BUDGET
    starts: int = 0

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def start(self, wait: bool = True) -> Node:
        self.starts += 1
        cfg = self.root.parent / f"{self.root.name}.toml"
        cfg.write_text(toml(self.config))
        self.addr = str(self.env.sock_dir / f"{uuid.uuid4().hex[:10]}.sock")
        self.log_path = self.root.parent / f"{self.root.name}.{self.starts}.log"
        entry = ["-m", "tests.fault.scenarios._faultwrap"] if self.wrapper else ["-m", "ckptd.daemon.cli"]
        args = [sys.executable, *entry, "serve", "--config", str(cfg), "--root", str(self.root),
                "--socket", self.addr, "--shm-dir", str(self.shm_dir), "--budget-bytes", str(self.budget_bytes)]
        env = clean_env({**AWS_ENV, "PYTHONPATH": str(REPO), **self.faults})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if wait:
            wait_for_daemon(Path(self.addr), self.proc, self.log_path, timeout_s=30)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_dead(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def restart(self, *, wipe_shm: bool = False, wipe_disk: bool = False, faults: dict[str, str] | None = None,
                wrapper: bool | None = None) -> Node:
        """Kill (if needed) and start again on what survived: the same root and shm unless wiped."""
        self.kill()
        if wipe_shm:
            shutil.rmtree(self.shm_dir, ignore_errors=True)
        if wipe_disk:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.faults = dict(faults or {})
        if wrapper is not None:
            self.wrapper = wrapper
        return self.start()


class Env:
    """Resources shared by the scenario runs of one session; ``close`` releases all of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ckf-", dir="/tmp"))  # short socket paths
        self.nodes: list[Node] = []
        self.proxies: list[FaultProxy] = []
        self.mounts: list[Path] = []
        self._moto: Any = None
        self._store: Store | None = None
        self.endpoint = ""
        self._reader: Node | None = None
        self.prefix = f"fault-{uuid.uuid4().hex[:8]}"

    # -- object store -----------------------------------------------------------------------
    def store(self) -> Store:
        if self._store is None:
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._moto.start()
            host, port = self._moto.get_host_and_port()
            self.endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                  aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)
            client.create_bucket(Bucket=BUCKET)
            self._store = Store(client, BUCKET, self.prefix)
        return self._store

    def object_config(self, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
        self.store()
        return {"enabled": True, "preset": "minio", "endpoint_url": endpoint or self.endpoint,
                "region": "us-east-1", "bucket": BUCKET, "prefix": self.prefix, "part_size_bytes": "5MiB",
                "max_attempts": 3, "connect_timeout_s": 2.0, "read_timeout_s": 5.0, "total_timeout_s": 20.0,
                **extra}

    def proxy(self) -> FaultProxy:
        self.store()
        p = FaultProxy(self.endpoint, bucket=BUCKET)
        self.proxies.append(p)
        return p

    def reader(self) -> Node:
        """An empty node on the store (no peers): what restores after the whole cluster is lost.

        Shared by the runs; its restores stay in its memory as re-warmed copies, which a later
        restore never evicts, so it is replaced by a fresh one before they fill half its budget."""
        r = self._reader
        if r is not None and r.alive():
            import grpc

            from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
            from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc

            with grpc.insecure_channel(f"unix:{r.addr}") as ch:
                used = pb_grpc.CheckpointServiceStub(ch).DaemonStatus(pb.DaemonStatusRequest(), timeout=10)
            if used.slot_bytes_in_use <= r.budget_bytes // 2:
                return r
            r.kill()
            shutil.rmtree(r.shm_dir, ignore_errors=True)
            shutil.rmtree(r.root, ignore_errors=True)
        r = self.node("reader", self.workdir / f"reader-{uuid.uuid4().hex[:4]}", object=self.object_config())
        r.budget_bytes = 4 * BUDGET
        self._reader = r.start()
        return r

    # -- nodes ------------------------------------------------------------------------------
    def node(self, name: str, run_dir: Path, *, ranks: tuple[int, ...] = (), object: dict[str, Any] | None = None,
             peers: dict[str, Any] | None = None, faults: dict[str, str] | None = None, wrapper: bool = False,
             extra: dict[str, dict[str, Any]] | None = None, root: Path | None = None) -> Node:
        """A node (not started) with the base config plus the given sections."""
        run_dir.mkdir(parents=True, exist_ok=True)
        config = base_config()
        if object:
            config["object"] = object
        if peers:
            config["peers"] = peers
        for section, items in (extra or {}).items():
            config.setdefault(section, {}).update(items)
        root = root or run_dir / f"{name}-root"
        root.mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm") / f"ckptd-fault-{uuid.uuid4().hex[:10]}"
        n = Node(name, self, config, ranks, dict(faults or {}), wrapper, root, shm)
        self.nodes.append(n)
        return n

    def cluster(self, run_dir: Path, names: tuple[str, ...], world_size: int, k: int = 1,
                object: dict[str, Any] | None = None) -> list[Node]:
        """Nodes with peer replication (rank r on node r % len(names)), not started."""
        ports = {n: free_port() for n in names}
        members = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
        out = []
        for name in names:
            ranks = tuple(r for r in range(world_size) if names[r % len(names)] == name)
            peers = {"listen": f"127.0.0.1:{ports[name]}", "node_id": name, "token": TOKEN, "peers": members,
                     "replication_factor": k, "push_timeout_s": 2.0, "fetch_timeout_s": 10.0, "max_attempts": 1,
                     "commit_timeout_s": 8.0}
            out.append(self.node(name, run_dir, ranks=ranks, peers=peers, object=object))
        return out

    def mount_tmpfs(self, path: Path, size_bytes: int) -> str:
        """Mount a size-capped tmpfs at path (needs root); returns '' or why it could not."""
        path.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            return (res.stderr or res.stdout).strip() or f"mount exited {res.returncode}"
        self.mounts.append(path)
        return ""

    def umount(self, path: Path) -> None:
        if path in self.mounts:
            self.mounts.remove(path)
            subprocess.run(["mount", "-o", "remount,rw", str(path)], capture_output=True)
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)

    def remount(self, path: Path, mode: str) -> None:
        """Remount a tmpfs of ours read-only ("ro") or writable ("rw")."""
        subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)

    def resize_tmpfs(self, path: Path, size_bytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True)

    def close(self) -> None:
        for n in self.nodes:
            n.kill()
            shutil.rmtree(n.shm_dir, ignore_errors=True)
        for m in list(reversed(self.mounts)):
            self.umount(m)
        for p in self.proxies:
            p.close()
        if self._moto is not None:
            self._moto.stop()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
