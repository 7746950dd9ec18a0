"""Spare slots: a rank's slots are made in the background, not in a later save's stall.

After a rank's first save, the daemon creates that rank's remaining slots by itself (the first
save left the rank no free slot); the pool never exceeds ``memory.slots_per_rank`` slots per
rank, and a spare never takes room the budget does not have free.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests.conftest import DaemonProc


def _slots(shm_dir: Path) -> list[Path]:
    return sorted(p for p in shm_dir.glob("slot-*.bin"))


def _eventually(pred: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_a_ranks_slots_are_created_before_the_saves_that_need_them(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(config_text="[memory]\nslots_per_rank = 3\n")
    state = {"w": np.arange(3 * 2**20 // 8, dtype=np.int64)}
    with CheckpointManager(f"spare{uuid.uuid4().hex[:6]}", rank=0, world_size=1, addr=d.addr) as m:
        h = m.save(1, state)
        assert h.ok
        # no second save yet: the other two slots can only be the daemon's spares
        assert _eventually(lambda: len(_slots(d.shm_dir)) == 3), _slots(d.shm_dir)
        for step in range(2, 9):
            assert m.save(step, state).ok
            assert len(_slots(d.shm_dir)) <= 3
        h = m.save(9, state)
        h.wait(Level.LOCAL_DURABLE, timeout_s=60)
    assert len(_slots(d.shm_dir)) <= 3


def test_a_spare_never_takes_room_the_budget_does_not_have(daemon_factory: Callable[..., DaemonProc]) -> None:
    # a 3 MiB shard takes a 4 MiB slot; a 10 MiB budget has room for two of them, not three
    d = daemon_factory(extra_args=["--budget-bytes", "10MiB"], config_text="[memory]\nslots_per_rank = 3\n")
    state = {"w": np.arange(3 * 2**20 // 8, dtype=np.int64)}
    with CheckpointManager(f"spare{uuid.uuid4().hex[:6]}", rank=0, world_size=1, addr=d.addr) as m:
        assert m.save(1, state).ok
        assert _eventually(lambda: len(_slots(d.shm_dir)) == 2), _slots(d.shm_dir)  # the spare fits
        for step in range(2, 7):
            h = m.save(step, state)
            assert h.ok, h.error
            h.wait(Level.LOCAL_DURABLE, timeout_s=60)
            time.sleep(0.2)  # room for a (wrong) third slot to appear
            assert len(_slots(d.shm_dir)) == 2


def test_the_client_maps_its_spares_ahead_so_no_later_save_maps_a_slot(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    """The first save maps one slot in its stall; the spares the daemon makes after it are mapped
    by the client's SlotWarmer in the background, so the saves that land in them map nothing,
    and what they commit is still the state's bytes."""
    d = daemon_factory(config_text="[memory]\nslots_per_rank = 3\n")
    state = {"w": np.arange(3 * 2**20 // 8, dtype=np.int64)}
    with CheckpointManager(f"warm{uuid.uuid4().hex[:6]}", rank=0, world_size=1, addr=d.addr) as m:
        assert m.save(1, state).ok
        assert m._maps.mapped_count == 1
        assert _eventually(lambda: m._saver.warmer.warmed == 2), (m._saver.warmer.warmed, _slots(d.shm_dir))
        for step in range(2, 7):
            state["w"] += 1
            h = m.save(step, state)
            assert h.ok, h.error
            h.wait(Level.LOCAL_DURABLE, timeout_s=60)
        assert m._maps.mapped_count == 1  # every later save found its slot mapped
        back = {"w": np.zeros_like(state["w"])}
        assert m.restore(back) == 6 and np.array_equal(back["w"], state["w"])
