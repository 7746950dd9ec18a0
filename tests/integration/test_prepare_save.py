"""prepare_save: a rank's save slots made, mapped and populated before its first save.

Against a real daemon and real /dev/shm slots: a prepared first save copies into a slot mapped
ahead (the save maps nothing) and restores bit-exact; preparing twice adds nothing; a shard
larger than the budget is a typed error (BudgetExhausted from ``wait``) that leaves saves
working; closing the manager mid-preparation leaves no mapping in this process and no slot
leased or beyond the rank's count in the daemon; a save racing the preparation maps no slot
twice. Malformed PrepareSave requests are refused in test_hostile_rpc.py's table.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import BudgetExhausted, DaemonUnavailable
from tests.conftest import DaemonProc
from tests.integration.test_roundtrip import assert_same
from tests.state_factory import byte_state, torch_state

MiB = 1 << 20


def _state(step: int, nbytes: int) -> dict[str, Any]:
    return {**torch_state(step, 0), "big": byte_state(step, nbytes)["w"]}


def _job() -> str:
    return f"prep{uuid.uuid4().hex[:6]}"


def _mapped(shm_dir: Path) -> list[str]:
    """The slot files of shm_dir this process maps now, one entry per mapping."""
    with open("/proc/self/maps") as f:
        return [line.split()[-1] for line in f if str(shm_dir) in line]


def _status(m: CheckpointManager) -> pb.DaemonStatusResponse:
    return m.conn.call(m.conn.stub.DaemonStatus, pb.DaemonStatusRequest())


def test_prepared_first_save_maps_nothing_and_restores_bit_exact(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(config_text="[memory]\nslots_per_rank = 2\n")
    job, state = _job(), _state(1, 6 * MiB)
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, on_error="raise") as m:
        prep = m.prepare_save(state)
        assert m.prepare_save(state) is prep  # running: the same preparation
        assert prep.wait(60)
        assert (prep.slots_wanted, prep.slots_ready, prep.slots_mapped) == (2, 2, 2)
        files = sorted(d.shm_dir.glob("slot-*.bin"))
        assert len(files) == 2 and sorted(_mapped(d.shm_dir)) == [str(p) for p in files]
        again = m.prepare_save(state)  # done: repeating it adds no slot and no mapping
        assert again.wait(30) and again.slots_ready == 2
        assert sorted(d.shm_dir.glob("slot-*.bin")) == files and len(_mapped(d.shm_dir)) == 2
        h = m.save(1, state)
        assert h.ok
        assert m._saver.maps.mapped_count == 0  # the save copied into a slot mapped ahead
        h.wait(Level.LOCAL_DURABLE, timeout_s=60)
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, on_error="raise") as m2:
        got = _state(2, 6 * MiB)
        assert m2.restore(got, 1) == 1
    assert_same(state, got)


def test_prepare_over_the_budget_is_a_typed_error_and_saves_go_on(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(extra_args=["--budget-bytes", "8MiB"])
    with CheckpointManager(_job(), rank=0, world_size=1, addr=d.addr, on_error="raise") as m:
        prep = m.prepare_save(byte_state(1, 16 * MiB))
        with pytest.raises(BudgetExhausted, match="budget"):
            prep.wait(30)
        assert isinstance(prep.error, BudgetExhausted) and prep.slots_mapped == 0
        assert not list(d.shm_dir.glob("slot-*.bin"))
        small = byte_state(2, 2 * MiB)
        h = m.save(1, small)
        assert h.ok, h.error
        h.wait(Level.STAGED, timeout_s=60)
        got = byte_state(3, 2 * MiB)
        assert m.restore(got, 1) == 1
        assert np.array_equal(got["w"], small["w"])


def test_close_during_preparation_leaves_no_mapping_and_no_leased_slot(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(config_text="[memory]\nslots_per_rank = 3\n")
    job, state = _job(), byte_state(1, 96 * MiB)
    m = CheckpointManager(job, rank=0, world_size=1, addr=d.addr, on_error="raise")
    prep = m.prepare_save(state)
    time.sleep(0.02)  # the daemon is making the slots (288 MiB, fallocate'd and faulted in)
    m.close()
    assert prep.done and isinstance(prep.error, DaemonUnavailable), prep.error  # cut short
    assert _mapped(d.shm_dir) == []
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, on_error="raise") as m2:
        deadline = time.monotonic() + 30
        while len(_status(m2).save_slots) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the daemon finishes the slots it was making: they are the rank's
        st = _status(m2)
        assert st.slots_busy == 0 and len(st.save_slots) == 3 == len(list(d.shm_dir.glob("slot-*.bin")))
        h = m2.save(1, state)
        assert h.ok and m2._saver.maps.mapped_count == 1  # a slot made for the closed manager
        h.wait(Level.STAGED, timeout_s=60)
        assert len(_status(m2).save_slots) == 3


def test_a_save_racing_the_preparation_maps_no_slot_twice(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory(config_text="[memory]\nslots_per_rank = 2\n")
    job, state = _job(), byte_state(1, 64 * MiB)
    with CheckpointManager(job, rank=0, world_size=1, addr=d.addr, on_error="raise") as m:
        prep = m.prepare_save(state)
        h = m.save(1, state)  # while the daemon makes the slots and the client maps them
        assert h.ok
        assert prep.wait(60) and prep.slots_ready == 2
        mapped = _mapped(d.shm_dir)
        assert len(mapped) == len(set(mapped)) == 2, mapped  # each slot mapped once
        assert len(list(d.shm_dir.glob("slot-*.bin"))) == 2  # the save took a prepared slot
        h.wait(Level.STAGED, timeout_s=60)
        got = byte_state(2, 64 * MiB)
        assert m.restore(got, 1) == 1
        assert np.array_equal(got["w"], state["w"])
