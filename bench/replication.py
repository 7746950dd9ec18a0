"""How fast does ckptd replicate a shard to a peer and fetch it back, against a bare TCP stream?

One run, three processes on this machine's loopback, the same ``--size-mib`` bytes (default 512,
random) held in this process's memory, ``--reps`` repetitions alternating which side goes first:

  tcp_s              floor: a bare TCP stream to another process: ``socket.sendall`` from a
                     memoryview into ``recv_into`` a preallocated buffer, until the receiver acks;
                     sampled in both phases (tcp_component_phase_s here, tcp_daemon_phase_s while
                     the daemons below are idle: before their saves, before each save of
                     ckptd_replicate_s and before each peer restore)
                     and tcp_s is the median of all of them
  tcp_fresh_s        the same into new shared memory each time (fallocate + mmap of a tmpfs file
                     after the accept): what a node that lost its RAM pays before any byte lands
  component_push_s   ``PeerClient.push`` of the shard (STAGED bytes with their crc32c list, as the
                     daemon holds them) to a ``PeerServer`` with the in-memory replica store in
                     another process, until the receiver verified every chunk and kept it
  component_fetch_s  ``PeerClient.fetch_into`` of that replica back into a preallocated buffer,
                     every chunk and integrity crc32c verified (checked bit-exact, untimed)
  *_grpc_s           the same two with bulk connections off: the bytes inside the gRPC stream,
                     4 MiB messages (the path used under TLS); ``--skip-grpc-path`` skips them

Then through two real ``ckptd serve`` daemons (nodes n1, n2; [peers] with k=1 on loopback; rank
0's shard of the same size, a dict {"w": uint8 array}, saved on n1). These are the contract's
figures (ckptd_replicate_s, restore_*_s); the component paths above show what the peer protocol
itself costs:

  ckptd_replicate_s      save() returned (STAGED) -> WaitStep(REPLICATED) returned: n1's daemon
                         checksummed and pushed the shard to n2 and the step's coordinator saw
                         every rank held (rank 1, a 16-byte shard on n2, is saved first so the
                         step is complete). Each save starts once the previous step is on disk
                         (LOCAL_DURABLE), right after a TCP probe: the replication alone, measured
                         in the same conditions as its floor
  daemon_save_s          save() itself (the client's stall: copy into the shm slot), for context
  *_back_to_back_s       the same two with the saves back to back (checkpointing every
                         iteration): each replication runs while the previous step's disk write
                         does, on the same cores
  *_cold_s               the same two for the first 3 saves, while both daemons still create
                         their slots (a job's first checkpoints); the others are its steady state
  restore_memory_s       restore() on n1, served from "memory", by a new CheckpointManager (a
                         restarted trainer) that mapped the memory copy's slot ahead
                         (warm_restore; client_memory_slot_premapped says it did)
  memcpy_s               its floor (DESIGN.md: restore from RAM <= 1.3x a memcpy): the same bytes
                         copied out of a populated /dev/shm mapping into the same destination
                         with the client's copy routine, no daemon; memcpy_fresh_map_s maps the
                         file anew inside the timed copy, so the page faults a restarted trainer
                         pays are in it (restore_memory_vs_memcpy* give both ratios)
  restore_disk_s         restore() after n1's daemon was SIGKILLed and restarted with its shm dir
                         wiped, served from "disk"
  restore_peer_s         restore() on a fresh n1 (SIGKILLed, root and shm wiped, restarted with
                         the same config), served from "peer" (the replica in n2's RAM). Timed
                         once the new daemon reports it prepared its restore slots (DaemonStatus
                         preparing_restore false: it allocated and mapped a slot for each of its
                         shards a peer holds, ckptd/restore/prep.py) and the trainer's manager,
                         created before that wait, mapped its rank's slot (warm_restore,
                         client restore/premap.py; client_restore_slot_premapped says it did), as a
                         trainer's own start-up would give them; the daemon's wait is reported
                         as daemon_prepare_wait_s
  restore_peer_unprepared_s  the same with peers.prepare_restore = false: the restore also
                         allocates its slot (compare with tcp_fresh_s)

Every restore is timed around ``CheckpointManager.restore`` into a preallocated array, then checked
bit-exact and for the tier that served it (``daemon_served_from`` lists them).

``cpu_s`` counts, per timed region and process, the CPU seconds used (mean over the reps): tcp
(sender, receiver), ckptd_replicate (sending and receiving daemon, the trainer waiting) and
restore_peer (restoring and serving daemon, the trainer copying); ``cpu_floor_s`` is each total
divided by this host's cpus, a wall time no overlap can beat here. Daemons are counted from
/proc/PID/stat (clock ticks, 10 ms), so a single region is coarse; the reps average it out.

Both component paths and the daemons move the bytes over a single connection; by default they use a one-time raw
TCP "bulk" connection negotiated inside the authenticated gRPC call (ckptd/peers/bulk.py).

The receiver reuses the buffer of the replica the previous repetition dropped, like the daemon
reuses slots, so neither side pays first-touch page faults inside the timed region. Figures are
medians over the reps (every sample is in the JSON); ratios are x / tcp (lower is better; the
contract is ckptd_replicate_s and restore_peer_s <= 2 x tcp_s). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ckptd.core.integrity import chunk_crcs  # noqa: E402
from ckptd.core.layout import TensorEntry  # noqa: E402
from ckptd.core.manifest import ReplicaHeader, ShardEntry  # noqa: E402
from ckptd.peers.client import PeerClient  # noqa: E402
from ckptd.peers.server import PeerServer, start_peer_server  # noqa: E402
from tests.peer.memory_store import MemoryReplicaStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _replication_daemons import CpuMeter, daemon_run  # noqa: E402

MIB = 2**20
INTEGRITY_CHUNK_BYTES = 16 * MIB  # ckptd's default crc32c chunk (memory.chunk_bytes)
TOKEN = os.environ.get("CKPTD_BENCH_TOKEN", "bench-peer-token-" + os.urandom(8).hex())


# -- child processes --------------------------------------------------------------------------
def tcp_sink(nbytes: int, fresh: bool = False) -> None:
    """Accept one connection per rep, recv_into one preallocated buffer, ack with one byte. With
    ``fresh``, every rep receives into new shared memory (a tmpfs file, fallocate'd and mapped
    after the accept), as a node that lost its RAM must: the floor of a fresh node's restore."""
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    view = memoryview(bytearray(nbytes))
    path = f"/dev/shm/ckbench-fresh-{os.getpid()}"
    while True:
        conn, _ = srv.accept()
        mm = None
        if fresh:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)
                mm = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            view = memoryview(mm)
        got = 0
        while got < nbytes:
            n = conn.recv_into(view[got:], min(nbytes - got, 4 * MIB))
            if n == 0:
                break
            got += n
        conn.sendall(b"k")
        conn.close()
        if mm is not None:
            view.release()
            mm.close()
            os.unlink(path)


async def peer_child() -> None:
    """A PeerServer with an in-memory store; stdin lines "drop JOB STEP RANK" free a replica."""
    store = MemoryReplicaStore("bench-receiver")
    servicer = PeerServer("bench-receiver", store, store, store.holdings)
    running = await start_peer_server(servicer, "127.0.0.1:0", TOKEN)
    print(running.port, flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        parts = line.split()
        if parts[:1] == ["drop"]:
            store.drop(parts[1], int(parts[2]), int(parts[3]))
        print("ok", flush=True)
    await running.stop(0)


def spawn(mode: str, size_bytes: int) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "CKPTD_BENCH_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, __file__, mode, "--size-mib", str(size_bytes / MIB)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


# -- timed sides ------------------------------------------------------------------------------
def tcp_once(port: int, view: memoryview) -> float:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        t0 = time.perf_counter()
        conn.sendall(view)
        if conn.recv(1) != b"k":
            raise RuntimeError("tcp sink did not ack")
        return time.perf_counter() - t0


def header_for(data: memoryview, step: int) -> ReplicaHeader:
    n = data.nbytes
    entry = ShardEntry(0, n, INTEGRITY_CHUNK_BYTES, tuple(chunk_crcs(data, INTEGRITY_CHUNK_BYTES)),
                       (TensorEntry("w", "uint8", (n,), 0, n),), {"d": [["w", {"a": 0}]]})
    return ReplicaHeader("bench", step, 1, entry, "bench-sender")


def control(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    if proc.stdout.readline().strip() != "ok":
        raise RuntimeError("peer child did not answer")


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    nbytes = int(ns.size_mib * MIB)
    data = bytearray(np.random.default_rng(0).bytes(nbytes))
    view = memoryview(data)
    back = bytearray(nbytes)  # preallocated (and touched) destination of the fetch
    tcp_proc, tcp_port = spawn("--tcp-sink", nbytes)
    fresh_proc, fresh_port = spawn("--tcp-sink-fresh", nbytes)
    peer_proc, peer_port = spawn("--peer-child", nbytes)
    target = f"127.0.0.1:{peer_port}"
    chunk = int(ns.chunk_mib * MIB)
    clients = {"": PeerClient(TOKEN, "bench-sender", chunk_bytes=chunk)}
    if not ns.skip_grpc_path:
        clients["_grpc"] = PeerClient(TOKEN, "bench-sender", chunk_bytes=chunk, bulk=False)
    samples: dict[str, list[float]] = {"tcp_component_phase_s": [], "tcp_fresh_s": []}
    tcp_cpu = CpuMeter({"sender": lambda: 0, "receiver": lambda: tcp_proc.pid})

    def tcp_floor() -> float:
        before = tcp_cpu.start()
        took = tcp_once(tcp_port, view)
        tcp_cpu.stop(before)
        return took
    for suffix in clients:
        samples[f"component_push{suffix}_s"] = []
        samples[f"component_fetch{suffix}_s"] = []
    step = 0

    async def ckptd_once(suffix: str, client: PeerClient, timed: bool) -> None:
        nonlocal step
        step += 1
        header = header_for(view, step)  # the crc32c list exists at STAGED: not timed
        t0 = time.perf_counter()
        res = await client.push(target, header, view, 600)
        replicate_s = time.perf_counter() - t0
        assert res.nbytes == nbytes and not res.already_held
        t0 = time.perf_counter()
        await client.fetch_into(target, "bench", step, 0, memoryview(back), 600)
        restore_s = time.perf_counter() - t0
        if back != data:
            raise RuntimeError("fetched replica differs from the source bytes")
        back[:1] = b"\0" if data[:1] != b"\0" else b"\1"  # the next check proves a new fetch
        control(peer_proc, f"drop bench {step} 0")  # its buffer serves the next replica
        if timed:
            samples[f"component_push{suffix}_s"].append(replicate_s)
            samples[f"component_fetch{suffix}_s"].append(restore_s)

    try:
        for suffix, client in clients.items():  # warm-up: connections, receiver buffer
            await ckptd_once(suffix, client, False)
        tcp_once(tcp_port, view)
        for rep in range(1, ns.reps + 1):
            order = ("tcp", *clients) if rep % 2 else (*clients, "tcp")
            for side in order:
                if side == "tcp":
                    samples["tcp_component_phase_s"].append(tcp_floor())
                    samples["tcp_fresh_s"].append(tcp_once(fresh_port, view))
                else:
                    await ckptd_once(side, clients[side], True)
        for client in clients.values():
            await client.close()
        clients.clear()
        daemon_samples, daemon_info = daemon_run(ns, nbytes, tcp_floor)
    finally:
        for client in clients.values():
            await client.close()
        for proc in (tcp_proc, fresh_proc, peer_proc):
            proc.kill()
            proc.wait()
    samples.update(daemon_samples)
    # the floor: every bare TCP sample of the run, from both phases
    samples["tcp_s"] = samples["tcp_component_phase_s"] + samples["tcp_daemon_phase_s"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    cpus = os.cpu_count() or 1
    cpu_s = {"tcp": tcp_cpu.per_region(), **daemon_info.pop("cpu_s")}
    return {
        "bytes": nbytes,
        "reps": ns.reps,
        "transfer_chunk_bytes": int(ns.chunk_mib * MIB),
        "integrity_chunk_bytes": INTEGRITY_CHUNK_BYTES,
        **med,
        **{f"{k[:-2]}_vs_tcp": v / med["tcp_s"] for k, v in med.items() if k != "tcp_s"},
        "restore_peer_unprepared_vs_tcp_fresh": med["restore_peer_unprepared_s"] / med["tcp_fresh_s"],
        "restore_memory_vs_memcpy": med["restore_memory_s"] / med["memcpy_s"],
        "restore_memory_vs_memcpy_fresh_map": med["restore_memory_s"] / med["memcpy_fresh_map_s"],
        "tcp_gbps": nbytes / med["tcp_s"] / 1e9,
        "component_push_gbps": nbytes / med["component_push_s"] / 1e9,
        "component_fetch_gbps": nbytes / med["component_fetch_s"] / 1e9,
        "ckptd_replicate_gbps": nbytes / med["ckptd_replicate_s"] / 1e9,
        "restore_peer_gbps": nbytes / med["restore_peer_s"] / 1e9,
        "cpu_s": cpu_s,
        # the least wall time those CPU seconds need on this host's cpus, whatever the overlap
        "cpu_floor_s": {k: v["total"] / cpus for k, v in cpu_s.items() if v},
        **daemon_info,
        "samples": samples,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=float, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=4, help="transfer chunk (<= 4)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--skip-grpc-path", action="store_true", help="measure only the bulk-connection path")
    ap.add_argument("--tcp-sink", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tcp-sink-fresh", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-child", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.tcp_sink or ns.tcp_sink_fresh:
        tcp_sink(int(ns.size_mib * MIB), fresh=ns.tcp_sink_fresh)
        return 0
    if ns.peer_child:
        asyncio.run(peer_child())
        return 0
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally stops the daemons and removes shm dirs
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    res = asyncio.run(run(ns))
    if not ns.json:
        for key, value in res.items():
            if key.endswith(("_s", "_vs_tcp", "_gbps")):
                print(f"{key:>28}: {value:.4f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
