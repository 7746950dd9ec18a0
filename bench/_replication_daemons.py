"""The daemon phase of bench/replication.py: two real ``ckptd serve`` daemons on loopback.

``daemon_run`` saves a shard on n1 and times STAGED -> REPLICATED (n2 takes the replica), then
restores it on n1 from memory, from disk (RAM lost) and from the peer (RAM and disk lost); the
module docstring of bench/replication.py says what each figure is. Beside the wall times it
counts the CPU seconds each process used in the timed regions (``CpuMeter``): on a host with few
cores the daemon paths run three busy processes (sender, receiver, trainer) where the bare TCP
floor runs two, and those CPU seconds divided by the cores are a wall time no schedule can beat.

Nothing here decides a result: every figure is measured and returned to bench/replication.py.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads, exited ones too) process ``pid`` has used; 0 is
    this process (``time.process_time``, finer than the clock ticks /proc/PID/stat counts in)."""
    if pid == 0:
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces; fields follow ")"
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


class CpuMeter:
    """CPU seconds of named processes over timed regions: ``with meter.region(): ...``, summed
    per name; ``per_region()`` gives the mean per region (each process's seconds, and "total")."""

    def __init__(self, pids: dict[str, Callable[[], int]]) -> None:
        self.pids = pids  # name -> current pid (a daemon restarted between regions changes pid)
        self.sums = {name: 0.0 for name in pids}
        self.regions = 0

    def start(self) -> dict[str, float]:
        return {name: proc_cpu_s(pid()) for name, pid in self.pids.items()}

    def stop(self, before: dict[str, float]) -> None:
        for name, pid in self.pids.items():
            self.sums[name] += proc_cpu_s(pid()) - before[name]
        self.regions += 1

    def per_region(self) -> dict[str, float]:
        if not self.regions:
            return {}
        out = {name: s / self.regions for name, s in self.sums.items()}
        out["total"] = sum(out.values())
        return out


DAEMON_NODES = ("n1", "n2")
WARM_REPS = 3  # saves until both daemons' slot pools are full (memory.slots_per_rank)
WAIT_S = 300.0  # bound on any one wait for a level


class MemcpyFloor:
    """The floor of a restore from RAM: the same bytes copied out of a /dev/shm file into the
    restore's destination with the client's own copy routine, no daemon. ``once(fresh=False)``
    reads a mapping made and populated beforehand (a bare copy); ``once(fresh=True)`` maps the
    file anew inside the timed region, so its page faults count, as they do for a trainer
    process that restarted and maps its slot for the first time."""

    def __init__(self, data: np.ndarray[Any, Any]) -> None:
        self.path = Path("/dev/shm") / f"ckbench-memcpy-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.nbytes = data.nbytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.nbytes)
            with mmap.mmap(fd, self.nbytes) as mm:
                np.frombuffer(mm, dtype=np.uint8)[:] = data.reshape(-1).view(np.uint8)
            self.fd = os.dup(fd)
        finally:
            os.close(fd)
        self.warm = mmap.mmap(self.fd, self.nbytes, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)

    def once(self, dst: np.ndarray[Any, Any], fresh: bool) -> float:
        from ckptd_client.restore import pcopy

        t0 = time.perf_counter()
        mm = mmap.mmap(self.fd, self.nbytes, prot=mmap.PROT_READ) if fresh else self.warm
        src = np.frombuffer(mm, dtype=np.uint8)
        pcopy.copyto(dst.reshape(-1).view(np.uint8), src)
        took = time.perf_counter() - t0
        del src
        if fresh:
            mm.close()
        return took

    def close(self) -> None:
        self.warm.close()
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemons:
    """Two ``ckptd serve`` daemons on loopback standing for two nodes, one rank each: rank 0 (the
    measured shard) on n1, its replica on n2; rank 1 (a tiny shard, so that the step is complete:
    REPLICATED is global) on n2. close() stops every daemon started and removes every shm dir."""

    def __init__(self, nbytes: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="ckbench-", dir="/tmp"))  # short: socket paths
        self.tag = uuid.uuid4().hex[:10]
        self.job = f"bench{uuid.uuid4().hex[:6]}"
        self.token = "bench-daemon-" + os.urandom(12).hex()
        self.budget = max(6 * nbytes, 256 * MIB)  # n1's slots, n2's replicas, restore slots
        self.ports = {n: free_port() for n in DAEMON_NODES}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.shm_dirs: set[Path] = set()
        self.starts = 0

    def root(self, node: str) -> Path:
        return self.base / f"{node}-root"

    def shm(self, node: str) -> Path:
        return Path("/dev/shm") / f"ckptd-bench-{self.tag}-{node}"

    def sock(self, node: str) -> Path:
        return self.base / f"{node}.sock"

    def start(self, node: str, prepare_restore: bool = True) -> None:
        peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in self.ports.items())
        cfg = self.base / f"{node}.toml"
        cfg.write_text(f'[memory]\n[peers]\nlisten = "127.0.0.1:{self.ports[node]}"\nnode_id = "{node}"\n'
                       f'token = "{self.token}"\npeers = "{peers}"\nreplication_factor = 1\n'
                       f'prepare_restore = {"true" if prepare_restore else "false"}\n')
        self.root(node).mkdir(parents=True, exist_ok=True)
        self.sock(node).unlink(missing_ok=True)
        self.shm_dirs.add(self.shm(node))
        self.starts += 1
        log = open(self.base / f"{node}-{self.starts}.log", "wb")  # noqa: SIM115 - the child holds it
        self.procs[node] = subprocess.Popen(
            [sys.executable, "-m", "ckptd.daemon.cli", "serve", "--root", str(self.root(node)), "--socket",
             str(self.sock(node)), "--shm-dir", str(self.shm(node)), "--budget-bytes", str(self.budget),
             "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        deadline = time.monotonic() + 60
        while not self.sock(node).exists():
            if self.procs[node].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ckptd {node} did not start:\n{self.log_tail(node)}")
            time.sleep(0.05)

    def log_tail(self, node: str) -> str:
        return (self.base / f"{node}-{self.starts}.log").read_text(errors="replace")[-4000:] \
            if (self.base / f"{node}-{self.starts}.log").exists() else ""

    def kill(self, node: str) -> None:
        proc = self.procs.pop(node, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)

    def lose(self, node: str, disk: bool) -> None:
        """SIGKILL the node's daemon and wipe its shm dir (and its disk root when ``disk``)."""
        self.kill(node)
        shutil.rmtree(self.shm(node), ignore_errors=True)
        if disk:
            shutil.rmtree(self.root(node), ignore_errors=True)

    def wait_prepared(self, node: str) -> tuple[float, int]:
        """Wait until the node's daemon prepared its restore slots; (seconds waited, slots)."""
        from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb

        t0 = time.perf_counter()
        with self.manager(node) as m:
            while True:
                st = m.conn.call(m.conn.stub.DaemonStatus, pb.DaemonStatusRequest())
                if not st.preparing_restore:
                    return time.perf_counter() - t0, st.restore_slots_prepared
                if time.perf_counter() - t0 > WAIT_S:
                    raise RuntimeError(f"{node} still preparing its restore slots after {WAIT_S}s")
                time.sleep(0.02)

    def manager(self, node: str, rank: int = 0) -> Any:
        from ckptd_client import CheckpointManager

        return CheckpointManager(self.job, rank=rank, world_size=2, addr=str(self.sock(node)),
                                 node_ranks=[rank], connect_timeout_s=60)

    def close(self) -> None:
        for node in list(self.procs):
            self.kill(node)
        for d in self.shm_dirs:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def daemon_run(ns: argparse.Namespace, nbytes: int,
               tcp_probe: Callable[[], float]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """STAGED -> REPLICATED through the daemons, then restores served from memory, disk, peer.

    ``tcp_probe`` (one bare TCP transfer) is also sampled here, while the daemons are idle: before
    the save loop, before each save of ckptd_replicate_s and before each peer restore, so the
    floor is taken beside what it divides."""
    from ckptd_client import Level

    src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty(nbytes, dtype=np.uint8)
    dst.fill(0)  # touched, so no restore pays first-touch faults in this process
    samples: dict[str, list[float]] = {k: [] for k in (
        "ckptd_replicate_s", "daemon_save_s", "restore_memory_s", "restore_disk_s", "restore_peer_s",
        "ckptd_replicate_cold_s", "daemon_save_cold_s", "daemon_prepare_wait_s", "restore_peer_unprepared_s",
        "ckptd_replicate_back_to_back_s", "daemon_save_back_to_back_s",
        "tcp_daemon_phase_s", "memcpy_s", "memcpy_fresh_map_s")}
    prepared: list[int] = []
    premapped: list[bool] = []
    premapped_memory: list[bool] = []
    served: dict[str, list[str]] = {}
    d = Daemons(nbytes)
    n1, n2 = (lambda: d.procs["n1"].pid), (lambda: d.procs["n2"].pid)
    cpu = {"ckptd_replicate": CpuMeter({"sending_daemon": n1, "receiving_daemon": n2, "trainer": lambda: 0}),
           "restore_peer": CpuMeter({"restoring_daemon": n1, "serving_daemon": n2, "trainer": lambda: 0})}

    def restore(key: str, node: str, step: int, expect: str, manager: Any = None) -> None:
        dst[:1] = src[:1] ^ 1  # the check below proves this restore wrote the bytes
        meter = cpu.get(key.removesuffix("_s"))
        with contextlib.nullcontext(manager) if manager is not None else d.manager(node) as m:
            state = {"w": dst}
            before = meter.start() if meter is not None else {}
            t0 = time.perf_counter()
            got = m.restore(state, step=step)
            took = time.perf_counter() - t0
            if meter is not None:
                meter.stop(before)
            info = m.last_restore
        assert info is not None
        served.setdefault(key, []).append(info.served_from)
        if got != step or info.served_from != expect:
            raise RuntimeError(f"{key}: restored step {got} from {info.served_from!r}, expected step {step} "
                               f"from {expect!r}")
        if not np.array_equal(state["w"], src):
            raise RuntimeError(f"{key}: restored bytes differ from the saved shard")
        samples[key].append(took)

    try:
        for node in DAEMON_NODES:
            d.start(node)
        step = 0
        for _ in range(ns.reps):
            samples["tcp_daemon_phase_s"].append(tcp_probe())
        with d.manager("n1") as m, d.manager("n2", rank=1) as other:
            # The first WARM_REPS fill the slot pools of both daemons (slots_per_rank = 3: each of
            # them creates a slot, fallocate + first-touch faults, once); they are recorded apart as
            # the cold figures, the rest are a job's steady state.
            # Then ns.reps saves back to back (each while the previous step's disk write runs:
            # checkpointing every iteration), then ns.reps more, each once the previous step is
            # on disk, with a TCP probe taken right before it: the replication alone, beside its
            # floor. The latter is ckptd_replicate_s; the CPU seconds are counted for it.
            for rep in range(2 * ns.reps + WARM_REPS):
                step += 1
                alone = rep >= ns.reps + WARM_REPS
                if alone:
                    m._wait(step - 1, Level.LOCAL_DURABLE, WAIT_S)
                    samples["tcp_daemon_phase_s"].append(tcp_probe())
                h1 = other.save(step, {"w": np.zeros(16, dtype=np.uint8)})  # rank 1 first: untimed
                if not h1.ok:
                    raise RuntimeError(f"save of rank 1 step {step} failed: {h1.error}")
                t0 = time.perf_counter()
                h = m.save(step, {"w": src})
                t1 = time.perf_counter()
                if not h.ok:
                    raise RuntimeError(f"save of step {step} failed: {h.error}")
                before = cpu["ckptd_replicate"].start()
                m._wait(step, Level.REPLICATED, WAIT_S)
                t2 = time.perf_counter()
                kind = "_cold" if rep < WARM_REPS else "" if alone else "_back_to_back"
                if alone:
                    cpu["ckptd_replicate"].stop(before)
                samples[f"daemon_save{kind}_s"].append(t1 - t0)
                samples[f"ckptd_replicate{kind}_s"].append(t2 - t1)
            m._wait(step, Level.LOCAL_DURABLE, WAIT_S)  # the disk copy the disk restore reads
        restore("restore_memory_s", "n1", step, "memory")  # warm-up
        samples["restore_memory_s"].clear()
        floor = MemcpyFloor(src)
        try:
            for _ in range(ns.reps):  # the copy floor taken beside each restore from RAM
                samples["memcpy_s"].append(floor.once(dst, fresh=False))
                samples["memcpy_fresh_map_s"].append(floor.once(dst, fresh=True))
                with d.manager("n1") as m:  # a restarted trainer: connects, builds its model,
                    premapped_memory.append(m.warm_restore())  # meanwhile maps the memory copy
                    restore("restore_memory_s", "n1", step, "memory", m)
        finally:
            floor.close()
        for _ in range(ns.reps):  # node restarted, RAM lost, disk kept
            d.lose("n1", disk=False)
            d.start("n1")
            restore("restore_disk_s", "n1", step, "disk")
        for _ in range(ns.reps):  # a fresh node n1: RAM and disk lost, the replica is on n2
            d.lose("n1", disk=True)
            d.start("n1")
            with d.manager("n1") as m:  # the trainer connects as it starts, then builds its model:
                waited, slots = d.wait_prepared("n1")  # what that start-up gives the daemon
                premapped.append(m.warm_restore())  # and the client (client restore/premap.py)
                samples["daemon_prepare_wait_s"].append(waited)
                prepared.append(slots)
                samples["tcp_daemon_phase_s"].append(tcp_probe())
                restore("restore_peer_s", "n1", step, "peer", m)
        for _ in range(ns.reps):  # the same with peers.prepare_restore = false
            d.lose("n1", disk=True)
            d.start("n1", prepare_restore=False)
            restore("restore_peer_unprepared_s", "n1", step, "peer")
    except BaseException:
        for node in DAEMON_NODES:
            sys.stderr.write(f"--- ckptd {node} log tail ---\n{d.log_tail(node)}\n")
        raise
    finally:
        d.close()
    return samples, {"cpu_s": {k: m.per_region() for k, m in cpu.items()},
                     "daemon_served_from": served, "daemon_budget_bytes": d.budget,
                     "daemon_restore_slots_prepared": prepared,
                     "client_restore_slot_premapped": premapped,
                     "client_memory_slot_premapped": premapped_memory,
                     "daemon_shm_dirs": sorted(str(p) for p in d.shm_dirs)}


