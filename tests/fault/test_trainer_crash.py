"""Trainer crashes while the daemon lives (DESIGN.md sections 5, 9; issue 2 item 7).

Real trainer subprocesses, real SIGKILL, real shm slots: the memory tier outlives the trainer,
and a slot torn by a trainer killed mid-copy is never taken for a committed shard.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.config import Config
from ckptd.core.types import Level
from tests.fault.faultkit import (
    JOB,
    Raw,
    committed_steps_everywhere,
    manager,
    read_line,
    restore_checked,
    rpc_code,
    sigkill,
    spawn_trainer,
    wait_log,
)
from tests.state_factory import MiB, fault_state

NBYTES = 1 * MiB
REAPED = f"save lease of {JOB}@4 rank 0 expired (client gone); slot torn, not committed"


def test_trainer_sigkill_restores_from_memory(daemon_factory):
    d = daemon_factory()
    trainer = spawn_trainer("save", d.addr, 5, NBYTES)
    try:
        read_line(trainer, "READY")
    finally:
        sigkill(trainer)
    assert trainer.returncode == -9
    assert d.alive()
    with Raw(d.addr) as raw:
        # the daemon checksums off the hot path; step 5 is acknowledged, so it must get there
        raw.wait_step(5, Level.STAGED, timeout_s=30)
    with manager(d.addr) as m:  # a new trainer process (this one) on the same node
        assert m.latest_step() == 5
        restore_checked(m, "latest", fault_state(5, 0, NBYTES), "memory")
        # the previous step is still held too (several slots per rank)
        restore_checked(m, 4, fault_state(4, 0, NBYTES), "memory")


SLOTS_PER_RANK = Config().memory.slots_per_rank  # the daemon's default cap for one rank


def _assert_committed_after_torn_step4(seen: dict) -> None:
    """Steps 1-3 were saved, step 4 torn. Step 3 is the latest and every query path agrees; the
    torn step is nowhere. Steps 1 and 2 may be gone already: the torn lease took one of their
    slots, and the drainer skips steps superseded before it got to them (which ones depends on
    timing), and a step whose last copy is gone is no longer listed."""
    assert seen["latest"] == 3, seen
    assert seen["all_steps"] == seen["listed"], seen
    assert 3 in seen["listed"] and set(seen["listed"]) <= {1, 2, 3}, seen


def test_trainer_sigkill_mid_copy_never_commits_torn_slot(daemon_factory):
    d = daemon_factory()
    trainer = spawn_trainer("torn", d.addr, 3, NBYTES)
    try:
        _, slot_path, _ = read_line(trainer, "TORN").split()
        with Raw(d.addr) as raw:
            # while the torn writer holds the lease, a second writer of (job, 4, 0) is refused
            code = rpc_code(lambda: raw.stub.BeginSave(pb.BeginSaveRequest(
                job=JOB, step=4, rank=0, world_size=1, nbytes=NBYTES), timeout=10))
            assert code == grpc.StatusCode.ALREADY_EXISTS
    finally:
        sigkill(trainer)
    assert Path(slot_path).exists()
    assert not Path(slot_path[: -len(".bin")] + ".meta.json").exists(), "leased slot kept a sidecar"

    wait_log(d, REAPED, timeout_s=10)  # the reaper notices the dead client within seconds
    with Raw(d.addr) as raw, manager(d.addr) as m:
        assert rpc_code(lambda: raw.step_status(4)) == grpc.StatusCode.NOT_FOUND
        _assert_committed_after_torn_step4(committed_steps_everywhere(m, raw))
        restore_checked(m, "latest", fault_state(3, 0, NBYTES), "memory")

        # the torn lease is gone: step 4 can be saved for real, and slots are reused, not grown
        for step in range(4, 11):
            h = m.save(step, fault_state(step, 0, NBYTES))
            assert h.ok, h.error
            h.wait(Level.STAGED, timeout_s=30)
            status = raw.status()
            assert status.slots <= SLOTS_PER_RANK, f"slot pool grew to {status.slots} slots at step {step}"
        h.wait(Level.LOCAL_DURABLE, timeout_s=30)
        restore_checked(m, "latest", fault_state(10, 0, NBYTES), "memory")
        restore_checked(m, 9, fault_state(9, 0, NBYTES), "memory")
        assert raw.status().slots <= SLOTS_PER_RANK
    assert d.alive()


def test_torn_slot_not_adopted_after_daemon_restart(daemon_factory):
    """Trainer killed mid-copy, then the daemon killed before it reaped the lease: the next
    daemon on the same shm must not take the torn slot for a shard."""
    d = daemon_factory()
    trainer = spawn_trainer("torn", d.addr, 3, NBYTES)
    try:
        _, slot_path, _ = read_line(trainer, "TORN").split()
    finally:
        sigkill(trainer)
    d.kill()
    torn = Path(slot_path)
    assert torn.exists()

    d2 = daemon_factory(root=d.root, shm_dir=d.shm_dir)
    assert not torn.exists(), "the torn slot (no sidecar) survived the restart scan"
    with Raw(d2.addr) as raw, manager(d2.addr) as m:
        assert rpc_code(lambda: raw.step_status(4)) == grpc.StatusCode.NOT_FOUND
        seen = committed_steps_everywhere(m, raw)
        assert seen["latest"] == 3 and 4 not in seen["all_steps"] and 4 not in seen["listed"], seen
        restore_checked(m, "latest", fault_state(3, 0, NBYTES), "memory")
        h = m.save(4, fault_state(4, 0, NBYTES))
        h.wait(Level.LOCAL_DURABLE, timeout_s=30)
        restore_checked(m, 4, fault_state(4, 0, NBYTES), "memory")


def test_rank_killed_mid_copy_leaves_step_partial_then_resume(daemon_factory):
    """Two ranks: rank 0 (this process) stages step 4, rank 1 (a trainer subprocess) is killed
    while copying it. Step 4 is never committed; both ranks resume from step 3 bit-exact and
    save step 4 again."""
    d = daemon_factory()
    ranks = [manager(d.addr, rank=r, world_size=2) for r in range(2)]
    m0, m1 = ranks
    try:
        # rank 1 runs beside this process: a rank may be at most one step ahead of the other
        # (two slots per rank), so both save steps 1..3 concurrently
        trainer = spawn_trainer("torn", d.addr, 3, NBYTES, rank=1, world_size=2)
        try:
            for step in (1, 2, 3):
                assert m0.save(step, fault_state(step, 0, NBYTES)).ok
            read_line(trainer, "TORN")
            h4 = m0.save(4, fault_state(4, 0, NBYTES))
            assert h4.ok, h4.error
        finally:
            sigkill(trainer)
        wait_log(d, f"save lease of {JOB}@4 rank 1 expired (client gone)", timeout_s=10)
        with Raw(d.addr) as raw:
            st = raw.step_status(4)
            assert list(st.staged_ranks) == [0] and st.level == 0, st
            _assert_committed_after_torn_step4(committed_steps_everywhere(m0, raw))
        # the restarted run resumes from step 3 on both ranks...
        for m in (m1, m0):
            restore_checked(m, "latest", fault_state(3, m.rank, NBYTES), "memory")
        # ...and saves step 4 again: the dead run's half of step 4 does not block or mix in
        h4 = [m.save(4, fault_state(4, m.rank, NBYTES)) for m in ranks]
        assert all(h.ok for h in h4), [h.error for h in h4]
        h4[0].wait(Level.LOCAL_DURABLE, timeout_s=30)
        for m in ranks:
            restore_checked(m, 4, fault_state(4, m.rank, NBYTES), "memory")
    finally:
        for m in ranks:
            m.close()
