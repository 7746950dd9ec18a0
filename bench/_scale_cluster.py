"""The measured phase of bench/scale.py: N real ``ckptd serve`` daemons on loopback stand for N nodes.

``Cluster`` starts the daemons (static membership of all of them, k = 1, the disk tier on, a
Prometheus exporter each), one ``CheckpointManager`` per rank in this process (``ranks_per_node``
ranks on each daemon) and runs steps: every rank saves a small shard, then rank 0 waits for the
step's global REPLICATED and LOCAL_DURABLE. ``measure`` returns, per node count:

  commit_replicated_s / commit_local_durable_s   median time from the last rank's save() to the
                       level seen by rank 0 (the coordinator collected every node's report)
  rpcs_per_step        PeerService calls per step from the daemons' own counters
                       (``ckptd_peer_rpcs_received_total`` / ``_sent_total`` scraped over HTTP):
                       received by the job's coordinator, mean and max received by the others,
                       mean sent per node, split by method
  cpu_s_per_step       CPU seconds per step of the coordinator's daemon and the others' mean
  replicas_per_node    replicas each daemon holds of the last step (ListHoldings, asked for real)
  loss                 a node (neither the coordinator nor rank 0's) SIGKILLed: detect_s, from
                       the kill to rank 0's wait of the next step failing with the reason naming
                       it (the commit's Ping check, ``peers.push_timeout_s``); replace_s, the
                       slowest push of that step by a node whose first target was the lost node
                       (its place handed to the next candidate); restore_s, a fresh daemon for
                       the lost node (empty RAM and disk) restoring its ranks from the peers
  report_cost          the coordinator's CPU seconds per ReportReady, from a burst of reports
                       this process sends it (PeerClient, real gRPC): the model's service time

Nothing here decides a result: each figure is measured and returned.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from _replication_daemons import proc_cpu_s
from _util import REPO

from ckptd.core.launch import die_with_parent

STEP_WAIT_S = 120.0
PUSH_TIMEOUT_S = 2.0  # the lost-node check's bound (peers.push_timeout_s), small so a run stays short
_HELD_RE = re.compile(r"step (\S+)@(\d+): this node's shards held by (\S+) in ([0-9.]+)s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """N daemons on loopback and the job's managers; close() stops them and removes their files."""

    def __init__(self, nodes: int, ranks_per_node: int, shard_bytes: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="ckscale-", dir="/tmp"))
        self.names = [f"n{i:03d}" for i in range(nodes)]
        self.ranks_per_node = ranks_per_node
        self.world = nodes * ranks_per_node
        self.shard_bytes = shard_bytes
        self.token = "bench-scale-" + os.urandom(12).hex()
        self.job = f"scale{uuid.uuid4().hex[:6]}"
        self.peer_ports = {n: _free_port() for n in self.names}
        self.metric_ports = {n: _free_port() for n in self.names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.managers: dict[int, Any] = {}
        self.starts = 0

    def node_of(self, rank: int) -> str:
        return self.names[rank // self.ranks_per_node]

    def sock(self, node: str) -> Path:
        return self.base / f"{node}.sock"

    def shm(self, node: str) -> Path:
        return Path("/dev/shm") / f"ckptd-scale-{self.base.name}-{node}"

    def log(self, node: str) -> Path:
        return self.base / f"{node}.log"

    def spawn(self, node: str) -> None:
        peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in self.peer_ports.items())
        cfg = self.base / f"{node}.toml"
        cfg.write_text(f'[metrics]\naddress = "127.0.0.1:{self.metric_ports[node]}"\n'
                       f'[peers]\nlisten = "127.0.0.1:{self.peer_ports[node]}"\nnode_id = "{node}"\n'
                       f'token = "{self.token}"\npeers = "{peers}"\nreplication_factor = 1\n'
                       f"push_timeout_s = {PUSH_TIMEOUT_S}\n")
        root = self.base / f"{node}-root"
        root.mkdir(exist_ok=True)
        self.sock(node).unlink(missing_ok=True)
        with open(self.log(node), "ab") as logf:
            self.procs[node] = subprocess.Popen(die_with_parent(
                [sys.executable, "-m", "ckptd.daemon.cli", "serve", "--root", str(root), "--socket",
                 str(self.sock(node)), "--shm-dir", str(self.shm(node)), "--budget-bytes", "64MiB",
                 "--config", str(cfg)]), stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_serving(self, nodes: list[str], timeout_s: float = 180.0) -> None:
        from ckptd_client.rpc import wait_until_serving

        deadline = time.monotonic() + timeout_s
        for n in nodes:
            wait_until_serving(self.sock(n), max(1.0, deadline - time.monotonic()), exit_code=self.procs[n].poll)

    def start(self) -> None:
        from ckptd_client import CheckpointManager

        for n in self.names:
            self.spawn(n)
        self.wait_serving(self.names)
        for r in range(self.world):
            node = self.node_of(r)
            first = self.names.index(node) * self.ranks_per_node
            self.managers[r] = CheckpointManager(self.job, rank=r, world_size=self.world, addr=str(self.sock(node)),
                                                 node_ranks=list(range(first, first + self.ranks_per_node)),
                                                 connect_timeout_s=60)

    def coordinator(self) -> str:
        from ckptd.peers.placement import Member, coordinator_for

        return coordinator_for([Member(n) for n in self.names], self.job)

    def first_target(self, rank: int) -> str:
        from ckptd.peers.placement import Member, preference, shard_key

        return preference([Member(n) for n in self.names], shard_key(self.job, rank), self.node_of(rank))[0]

    def counters(self) -> dict[str, dict[str, float]]:
        """Per node: '<received|sent>:<method>' -> count, read from the node's /metrics."""
        out: dict[str, dict[str, float]] = {}
        for n in self.names:
            if n not in self.procs:
                continue
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metric_ports[n]}/metrics", timeout=10).read()
            got: dict[str, float] = {}
            for m in re.finditer(r'^ckptd_peer_rpcs_(received|sent)_total\{method="([^"]+)"\} (\S+)$',
                                 text.decode(), re.M):
                got[f"{m.group(1)}:{m.group(2)}"] = float(m.group(3))
            out[n] = got
        return out

    def cpu(self) -> dict[str, float]:
        return {n: proc_cpu_s(p.pid) for n, p in self.procs.items()}

    def step(self, step: int, skip_node: str = "") -> float:
        """Every rank (but ``skip_node``'s) saves; the time the last save returned."""
        arr = np.full(self.shard_bytes, step % 251, dtype=np.uint8)
        for r, m in self.managers.items():
            if self.node_of(r) != skip_node:
                h = m.save(step, {"w": arr})
                if not h.ok:
                    raise RuntimeError(f"save of rank {r} step {step}: {h.error}")
        return time.perf_counter()

    def kill(self, node: str) -> None:
        p = self.procs.pop(node)
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    def held_lines(self, node: str, step: int) -> list[tuple[str, float]]:
        """(holders, seconds) of the node's log line saying who holds its shards of ``step``."""
        return [(m.group(3), float(m.group(4))) for m in _HELD_RE.finditer(self.log(node).read_text(errors="replace"))
                if m.group(1) == self.job and int(m.group(2)) == step]

    def close(self) -> None:
        for m in self.managers.values():
            m.close()
        for n in list(self.procs):
            self.kill(n)
        for n in self.names:
            shutil.rmtree(self.shm(n), ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


Counts = dict[str, dict[str, float]]


def _diff(after: Counts, before: Counts, steps: int) -> Counts:
    return {n: {k: (v - before.get(n, {}).get(k, 0.0)) / steps for k, v in got.items()} for n, got in after.items()}


def _total(per: dict[str, float], side: str) -> float:
    return sum(v for k, v in per.items() if k.startswith(side + ":"))


async def _report_burst(target: str, token: str, reports: int, concurrency: int) -> float:
    """Send ``reports`` ReportReady calls (a job nobody saves) to ``target``; the seconds taken."""
    from ckptd.peers.client import PeerClient
    from ckptd.peers.types import ReadyReport

    client = PeerClient(token, "bench-prober", max_attempts=1)
    job = f"probe{uuid.uuid4().hex[:6]}"
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.report_ready(target, ReadyReport(job, 1, reports + 1, "peer", f"p{i % 997}", (i,)))
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(reports)))
    finally:
        await client.close()
    return time.perf_counter() - t0


def measure(nodes: int, ranks_per_node: int, shard_bytes: int, steps: int, loss: bool) -> dict[str, Any]:
    from ckptd_client import Level

    c = Cluster(nodes, ranks_per_node, shard_bytes)
    try:
        c.start()
        m0 = c.managers[0]
        coord = c.coordinator()
        warm = 2  # slot pools fill during the first saves
        for s in range(1, warm + 1):
            c.step(s)
            m0._wait(s, Level.REPLICATED, STEP_WAIT_S)
            m0._wait(s, Level.LOCAL_DURABLE, STEP_WAIT_S)
        time.sleep(0.5)
        before, cpu0 = c.counters(), c.cpu()
        rep, dur = [], []
        for s in range(warm + 1, warm + steps + 1):
            t = c.step(s)
            m0._wait(s, Level.REPLICATED, STEP_WAIT_S)
            rep.append(time.perf_counter() - t)
            m0._wait(s, Level.LOCAL_DURABLE, STEP_WAIT_S)
            dur.append(time.perf_counter() - t)
        time.sleep(0.5)  # the other nodes' pollers learn the last step is complete
        per = _diff(c.counters(), before, steps)
        cpu1 = c.cpu()
        last = warm + steps
        others = [n for n in c.names if n != coord]
        received = {n: _total(per[n], "received") for n in c.names}
        out: dict[str, Any] = {
            "nodes": nodes, "ranks_per_node": ranks_per_node, "world_size": c.world, "shard_bytes": shard_bytes,
            "steps": steps, "coordinator": coord,
            "commit_replicated_s": statistics.median(rep), "commit_local_durable_s": statistics.median(dur),
            "rpcs_per_step": {
                "coordinator_received": received[coord],
                "coordinator_received_by_method": {k.split(":")[1]: v for k, v in per[coord].items()
                                                   if k.startswith("received:") and v},
                "other_received_mean": statistics.mean(received[n] for n in others),
                "other_received_max": max(received[n] for n in others),
                "sent_mean": statistics.mean(_total(per[n], "sent") for n in c.names),
                "sent_by_method_mean": {k.split(":")[1]: statistics.mean(per[n].get(k, 0.0) for n in c.names)
                                        for k in sorted({k for n in c.names for k in per[n] if k.startswith("sent:")})},
            },
            "cpu_s_per_step": {"coordinator": (cpu1[coord] - cpu0[coord]) / steps,
                               "other_mean": statistics.mean((cpu1[n] - cpu0[n]) / steps for n in others)},
        }
        out["replicas_per_node"] = _holdings(c, last)
        burst = 400 * max(1, nodes // 4)
        before_cpu = proc_cpu_s(c.procs[coord].pid)
        took = asyncio.run(_report_burst(f"127.0.0.1:{c.peer_ports[coord]}", c.token, burst, 32))
        out["report_cost"] = {"reports": burst, "wall_s": took,
                              "coordinator_cpu_s_per_report": (proc_cpu_s(c.procs[coord].pid) - before_cpu) / burst}
        if loss and nodes >= 3:
            out["loss"] = _lose_one(c, coord, last)
        out["temp_paths"] = [str(c.base), *(str(c.shm(n)) for n in c.names)]
        return out
    except BaseException:
        for n in c.names:
            tail = c.log(n).read_text(errors="replace")[-1500:] if c.log(n).exists() else ""
            sys.stderr.write(f"--- ckptd {n} log tail ---\n{tail}\n")
        raise
    finally:
        c.close()


def _holdings(c: Cluster, step: int) -> dict[str, int]:
    from ckptd.peers.client import PeerClient

    async def ask() -> dict[str, int]:
        client = PeerClient(c.token, "bench-prober", max_attempts=2)
        try:
            out = {}
            for n in c.names:
                held = await client.list_holdings(f"127.0.0.1:{c.peer_ports[n]}", c.job, 10.0)
                out[n] = sum(1 for h in held if h.step == step and h.source_node != n)  # replicas, not own
            return out
        finally:
            await client.close()
    return asyncio.run(ask())


def _lose_one(c: Cluster, coord: str, last: int) -> dict[str, Any]:
    """SIGKILL a node; time the detection, the re-placement and the lost node's restore."""
    from ckptd_client import CheckpointManager, Level

    from ckptd.core.errors import CkptdError

    rank0 = c.node_of(0)
    lost = max((n for n in c.names if n not in (coord, rank0)),
               key=lambda n: sum(1 for r in range(c.world) if c.first_target(r) == n))
    lost_ranks = [r for r in range(c.world) if c.node_of(r) == lost]
    for r in lost_ranks:
        c.managers.pop(r).close()
    step = last + 1
    t_kill = time.perf_counter()
    c.kill(lost)
    c.step(step, skip_node=lost)
    reason = ""
    try:
        c.managers[0]._wait(step, Level.REPLICATED, STEP_WAIT_S)
    except CkptdError as exc:
        reason = str(exc)
    detect_s = time.perf_counter() - t_kill
    replaced = [c.node_of(r) for r in c.managers if c.first_target(r) == lost]
    held = [h for n in sorted(set(replaced)) for h in c.held_lines(n, step)]
    # a fresh node in the lost one's place: empty RAM and disk, same id and port; restores its ranks
    shutil.rmtree(c.base / f"{lost}-root", ignore_errors=True)
    shutil.rmtree(c.shm(lost), ignore_errors=True)
    c.spawn(lost)
    c.wait_serving([lost])
    t0 = time.perf_counter()
    served = []
    for r in lost_ranks:
        first = c.names.index(lost) * c.ranks_per_node
        with CheckpointManager(c.job, rank=r, world_size=c.world, addr=str(c.sock(lost)),
                               node_ranks=list(range(first, first + c.ranks_per_node))) as m:
            got = {"w": np.zeros(c.shard_bytes, dtype=np.uint8)}
            restored = m.restore(got, step=last)
            info = m.last_restore
            served.append(info.served_from if info is not None else "")
            if restored != last or int(got["w"][0]) != last % 251:
                raise RuntimeError(f"restore of rank {r}: step {restored}, bytes {int(got['w'][0])}")
    return {"lost_node": lost, "detect_s": detect_s, "reason": reason[:300],
            "push_timeout_s": PUSH_TIMEOUT_S, "replaced_pushes": len(held),
            "replace_s": max((s for _, s in held), default=None),
            "replaced_to": sorted({h for hs, _ in held for h in hs.split(",")}),
            "restore_s": time.perf_counter() - t0, "restore_served_from": served}


if __name__ == "__main__":  # one node count, for a quick look: python -m bench._scale_cluster 4
    print(json.dumps(measure(int(sys.argv[1]), 1, 64 * 1024, 5, True), indent=1))
