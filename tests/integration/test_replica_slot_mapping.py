"""A replica slot written through its file is mapped into the receiving daemon right after.

A node receiving a replica into a new slot writes it through the slot's file (its pages are not
mapped into the daemon yet, and faulting 4 KiB pages in one by one costs more than the copy).
The daemon then maps that slot in the background, so the next replica landing in it goes
straight into the mapping without a page fault. Checked on a real receiving daemon through
/proc/PID/smaps: every replica slot it holds ends up fully resident in its own address space, and
a restore from that replica stays bit-exact.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests._ckptd_helpers import peer_nodes
from tests.conftest import DaemonProc
from tests.state_factory import byte_state

TOKEN = "test-peer-token-0123456789"
NBYTES = 24 * 2**20


def _resident_bytes(pid: int, shm_dir: Path) -> dict[str, int]:
    """Resident bytes of each slot file mapped in process ``pid`` (from /proc/PID/smaps)."""
    out: dict[str, int] = {}
    current: str | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and "-" in fields[0] and fields[5].startswith(str(shm_dir)):
            current = Path(fields[5]).name if fields[5].endswith(".bin") else None
        elif len(fields) >= 6 and "-" in fields[0]:
            current = None
        elif current is not None and fields[:1] == ["Rss:"]:
            out[current] = out.get(current, 0) + int(fields[1]) * 1024
    return out


def test_replica_slots_end_up_mapped_in_the_receiver(daemon_factory: Callable[..., DaemonProc]) -> None:
    nodes = peer_nodes(daemon_factory, ("n1", "n2"), TOKEN)
    job = f"map{uuid.uuid4().hex[:6]}"
    receiver = nodes["n2"]
    with CheckpointManager(job, rank=0, world_size=1, addr=nodes["n1"].addr) as m:
        for step in range(1, 4):
            state = byte_state(step, NBYTES)
            assert m.save(step, state).ok
            m._wait(step, Level.REPLICATED, 60)
            # the replica slots n2 holds (files of NBYTES or more) become resident in n2 itself;
            # after step 1 there is one, written through its file, so nothing else maps it in
            slots = {p.name for p in receiver.shm_dir.glob("slot-*.bin") if p.stat().st_size >= NBYTES}
            assert slots
            deadline = time.monotonic() + 20
            while True:
                rss = _resident_bytes(receiver.proc.pid, receiver.shm_dir)
                if all(rss.get(s, 0) >= NBYTES for s in slots) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert all(rss.get(s, 0) >= NBYTES for s in slots), (step, slots, rss)
    # the replica held there is still the last step's bytes: lose n1, restore from n2
    nodes["n1"].kill()
    config = nodes["n1"].args[nodes["n1"].args.index("--config") + 1]
    fresh = daemon_factory(config_text=Path(config).read_text())  # same node id and port, new root and shm
    with CheckpointManager(job, rank=0, world_size=1, addr=fresh.addr) as m:
        got = {"w": np.zeros(NBYTES, dtype=np.uint8)}
        assert m.restore(got) == 3
        assert m.last_restore is not None and m.last_restore.served_from == "peer"
        assert got["w"].tobytes() == byte_state(3, NBYTES)["w"].tobytes()
