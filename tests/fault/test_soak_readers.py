"""Saves racing readers and an operator: no acknowledged save is lost, every read is exact or clear.

Two ranks save every step (each its own manager and thread) while two readers restore older
steps of either rank (their own managers) and an operator loop runs ``ckptctl gc`` and
``ckptctl rm`` of older steps. At the end every step whose ``save()`` returned OK on both ranks
reached LOCAL_DURABLE, or was superseded on purpose by the disk drain, or was removed by the
operator (who only removes committed copies); none was lost ("not known", "not committed").
Every restore returned the exact bytes saved for that (step, rank), or a clear NotFound.

``CKPTD_SOAK_S`` sets the duration (12 s by default in the suite; the issue's 60 s by hand).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
from ckptd_client import CheckpointManager, CkptdError, Level, NotFound

from tests.conftest import DaemonProc

SOAK_S = float(os.environ.get("CKPTD_SOAK_S", "12"))
JOB = "soak"
N = 16 * 1024  # int64 values per shard (128 KiB)
CTL = [sys.executable, "-m", "ckptd.ctl.main"]


def state_for(step: int, rank: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(N, dtype=np.int64) * (step + 1) + rank * 7919}


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
    return subprocess.run([*CTL, *args], capture_output=True, text=True, env=env, timeout=60)


def test_saves_racing_readers_and_an_operator_lose_nothing(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(config_text="[disk]\nmax_to_keep = 6\n")
    stop = threading.Event()
    acked: dict[int, set[int]] = {}  # step -> ranks whose save() returned OK
    removed: set[int] = set()  # steps the operator's rm removed a copy of
    problems: list[str] = []
    reads = {"exact": 0, "not_found": 0}
    lock = threading.Lock()

    def trainer(rank: int) -> None:
        with CheckpointManager(JOB, rank=rank, world_size=2, addr=d.addr, on_error="warn") as m:
            step = 0
            while not stop.is_set():
                h = m.save(step, state_for(step, rank))
                if h.ok:
                    with lock:
                        acked.setdefault(step, set()).add(rank)
                step += 1
                time.sleep(0.05)

    def reader(rank: int, seed: int) -> None:
        rng = random.Random(seed)
        with CheckpointManager(JOB, rank=rank, world_size=2, addr=d.addr) as m:
            while not stop.is_set():
                with lock:
                    done = [s for s, ranks in acked.items() if len(ranks) == 2]
                if len(done) < 2:
                    time.sleep(0.05)
                    continue
                step = rng.choice(sorted(done)[-8:-1])  # an older step, likely still held somewhere
                got = {"x": np.zeros(N, dtype=np.int64)}
                try:
                    m.restore(got, step=step)
                except NotFound:
                    with lock:
                        reads["not_found"] += 1
                    continue
                except CkptdError as exc:
                    with lock:
                        problems.append(f"restore of {step}/{rank}: {type(exc).__name__}: {exc}")
                    continue
                if not np.array_equal(got["x"], state_for(step, rank)["x"]):
                    with lock:
                        problems.append(f"restore of {step}/{rank}: wrong bytes")
                with lock:
                    reads["exact"] += 1

    def operator(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            ctl("gc", "--addr", d.addr)
            with lock:
                done = sorted(s for s, ranks in acked.items() if len(ranks) == 2)
            if len(done) > 3:
                step = rng.choice(done[-6:-3])  # not the newest: rm refuses the latest without --force
                res = ctl("rm", f"{JOB}@{step}", "--yes", "--addr", d.addr)
                if res.returncode == 0:
                    with lock:
                        removed.add(step)
            time.sleep(0.2)

    threads = [threading.Thread(target=trainer, args=(r,)) for r in range(2)]
    threads += [threading.Thread(target=reader, args=(r, 10 + r)) for r in range(2)]
    threads.append(threading.Thread(target=operator, args=(99,)))
    for t in threads:
        t.start()
    time.sleep(SOAK_S)
    stop.set()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)

    outcome = {"durable": 0, "superseded": 0, "removed": 0}
    log = d.log()  # the drain logs each step it made durable: retention may have removed it since
    with CheckpointManager(JOB, rank=0, world_size=2, addr=d.addr) as m:
        for step in sorted(s for s, ranks in acked.items() if len(ranks) == 2):
            if f"step {JOB}@{step} LOCAL_DURABLE (" in log:
                outcome["durable"] += 1
                continue
            if f"{JOB}@{step} disk tier: SKIPPED (superseded" in log:
                outcome["superseded"] += 1  # the drain skipped it for a newer step; since forgotten
                continue
            try:
                m._wait(step, Level.LOCAL_DURABLE, 30)
                outcome["durable"] += 1
            except CkptdError as exc:
                text = str(exc)
                if "superseded" in text:
                    outcome["superseded"] += 1
                elif step in removed:
                    outcome["removed"] += 1
                else:
                    problems.append(f"acknowledged step {step} lost: {type(exc).__name__}: {text}")
    print(f"soak {SOAK_S:.0f}s: {len(acked)} steps acknowledged, {outcome}, reads {reads}, "
          f"operator removed {len(removed)}")
    assert not problems, problems[:10]
    assert outcome["durable"] > 0 and reads["exact"] > 0
