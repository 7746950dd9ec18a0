"""A trainer process for the fault suite, run as a subprocess and SIGKILLed by the test.

    python fault_trainer.py save ADDR LAST_STEP NBYTES [RANK WORLD_SIZE]
        saves steps 1..LAST_STEP of rank RANK (default 0 of 1) through CheckpointManager,
        prints "SAVED <step>" after each, then "READY" and sleeps until killed.
    python fault_trainer.py torn ADDR LAST_STEP NBYTES [RANK WORLD_SIZE]
        as ``save``, then leases step LAST_STEP+1 with a raw BeginSave (client_pid = own pid),
        maps the slot, writes half of the bytes, prints "TORN <slot_path> <nbytes>" and sleeps
        until killed: a trainer killed mid-copy.

Only numpy is used, so the process starts quickly.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from ckptd_client.tree import flatten  # noqa: E402

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb  # noqa: E402
from tests.fault.faultkit import JOB, manager  # noqa: E402
from tests.state_factory import fault_state  # noqa: E402


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    mode, addr, last, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rank, world_size = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 5 else (0, 1)
    m = manager(addr, rank=rank, world_size=world_size, on_error="raise")
    for step in range(1, last + 1):
        h = m.save(step, fault_state(step, rank, nbytes))
        assert h.ok, h.error
        say(f"SAVED {step}")
    if mode == "torn":
        step = last + 1
        _, _, _, total = flatten(fault_state(step, rank, nbytes))
        begin = m.conn.stub.BeginSave(pb.BeginSaveRequest(
            job=JOB, step=step, rank=rank, world_size=world_size, nbytes=total,
            client_pid=os.getpid()),
            timeout=30)
        fd = os.open(begin.slot_path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, begin.slot_capacity_bytes)
        finally:
            os.close(fd)
        half = total // 2
        mm[:half] = b"\xab" * half  # part of the copy, then the trainer dies
        say(f"TORN {begin.slot_path} {total}")
    else:
        say("READY")
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
