"""A trainer process for the scenarios, run as a subprocess and SIGKILLed by its scenario.

    python -m tests.fault.scenarios._trainer ADDR JOB SEED NBYTES WORLD_SIZE RANK LAST_STEP TORN

Saves steps 1..LAST_STEP of RANK through CheckpointManager with the scenarios' deterministic
states, printing "SAVED <step> <ok> <seconds>" after each. With TORN > 0 it then leases step
LAST_STEP+1 with a raw BeginSave (client_pid = its own pid), copies the first TORN fraction of
that step's real bytes into the slot, prints "TORN <slot_path>" and sleeps until killed: a
trainer killed in the middle of its copy. Otherwise it prints "READY" and sleeps.
"""

from __future__ import annotations

import mmap
import os
import sys
import time

from ckptd_client import CheckpointManager
from ckptd_client.tree import copy_into, flatten

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from tests.state_factory import ledger_state


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    addr, job = sys.argv[1], sys.argv[2]
    seed, nbytes, world, rank, last = (int(a) for a in sys.argv[3:8])
    torn = float(sys.argv[8])
    m = CheckpointManager(job, rank=rank, world_size=world, addr=addr, wait_timeout_s=5.0)
    for step in range(1, last + 1):
        t0 = time.perf_counter()
        h = m.save(step, ledger_state(seed, step, rank, 0, nbytes))
        say(f"SAVED {step} {int(h.ok)} {time.perf_counter() - t0:.4f}")
    if torn <= 0:
        say("READY")
    else:
        step = last + 1
        leaves, tensors, _, total = flatten(ledger_state(seed, step, rank, 0, nbytes))
        begin = m.conn.stub.BeginSave(pb.BeginSaveRequest(
            job=job, step=step, rank=rank, world_size=world, nbytes=total, client_pid=os.getpid()), timeout=30)
        full = bytearray(total)
        copy_into(full, leaves, tensors)
        fd = os.open(begin.slot_path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, begin.slot_capacity_bytes)
        finally:
            os.close(fd)
        cut = int(total * torn)
        mm[:cut] = full[:cut]  # part of the copy, then the trainer dies
        say(f"TORN {begin.slot_path}")
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
