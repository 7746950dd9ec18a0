"""A restarted job never mixes shards of a dead run into a step of the new run, and a read never
drops a step being saved.

Rank 0 stages step 3, rank 1 dies before it does: step 3 is partial and never committed. The job
restores step 2 and saves step 3 again with different bytes: the committed step 3 must hold the
new run's shards only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests.conftest import DaemonProc


def test_partial_step_of_dead_run_is_dropped_by_the_new_runs_save(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory()
    r0 = CheckpointManager("inc", rank=0, world_size=2, addr=d.addr)
    r1 = CheckpointManager("inc", rank=1, world_size=2, addr=d.addr)
    for step in (1, 2):
        for m in (r0, r1):
            assert m.save(step, {"x": np.full(1000, step, dtype=np.int64)}).ok
    r1.handles[-1].wait(Level.STAGED, timeout_s=30)
    assert r0.save(3, {"x": np.full(1000, -1, dtype=np.int64)}).ok  # old run: rank 1 never saves 3
    assert r0.latest_step() == 2

    states = [{"x": np.zeros(1000, dtype=np.int64)} for _ in range(2)]
    assert r0.restore(states[0]) == 2
    assert r1.restore(states[1]) == 2
    for m in (r0, r1):
        h = m.save(3, {"x": np.full(1000, 30 + m.rank, dtype=np.int64)})
        assert h.ok, h.error
    r0.handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=30)
    for m in (r0, r1):
        st = {"x": np.zeros(1000, dtype=np.int64)}
        assert m.restore(st) == 3
        assert (st["x"] == 30 + m.rank).all()
    r0.close()
    r1.close()


def test_a_reader_restoring_an_older_step_never_drops_a_step_being_saved(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    """Rank 0 stages step 2; a reader (an operator's restore, an evaluation process) restores step
    1 for rank 0; then rank 1 stages step 2. The acknowledged step 2 must commit: a read is no sign
    that rank 0's trainer restarted."""
    d = daemon_factory()
    r0 = CheckpointManager("rd", rank=0, world_size=2, addr=d.addr)
    r1 = CheckpointManager("rd", rank=1, world_size=2, addr=d.addr)
    for m in (r0, r1):
        assert m.save(1, {"x": np.full(1000, 10 + m.rank, dtype=np.int64)}).ok
    r1.handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=30)
    h0 = r0.save(2, {"x": np.full(1000, 20, dtype=np.int64)})
    assert h0.ok, h0.error

    reader = CheckpointManager("rd", rank=0, world_size=2, addr=d.addr)
    got = {"x": np.zeros(1000, dtype=np.int64)}
    assert reader.restore(got, step=1) == 1 and (got["x"] == 10).all()
    reader.close()

    h1 = r1.save(2, {"x": np.full(1000, 21, dtype=np.int64)})
    assert h1.ok, h1.error
    h1.wait(Level.LOCAL_DURABLE, timeout_s=30)
    for m in (r0, r1):
        st = {"x": np.zeros(1000, dtype=np.int64)}
        assert m.restore(st) == 2
        assert (st["x"] == 20 + m.rank).all()
    r0.close()
    r1.close()


def test_a_restarted_job_drops_the_dead_runs_shards(daemon_factory: Callable[..., DaemonProc]) -> None:
    """A new run (new processes: new managers, which resume first and find no checkpoint) saves
    step 3 again: the dead run's shard of step 3 goes, and the step commits with the new run's
    bytes for both ranks."""
    d = daemon_factory()
    old0 = CheckpointManager("rs", rank=0, world_size=2, addr=d.addr)
    assert old0.save(3, {"x": np.full(1000, -1, dtype=np.int64)}).ok  # the dead run: rank 1 never saved 3
    old0.close()
    new = [CheckpointManager("rs", rank=r, world_size=2, addr=d.addr) for r in (0, 1)]
    for m in new:
        assert m.restore({"x": np.zeros(1000, dtype=np.int64)}) is None  # nothing committed: a fresh start
        h = m.save(3, {"x": np.full(1000, 30 + m.rank, dtype=np.int64)})
        assert h.ok, h.error
    new[1].handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=30)
    for m in new:
        st = {"x": np.zeros(1000, dtype=np.int64)}
        assert m.restore(st) == 3
        assert (st["x"] == 30 + m.rank).all()
        m.close()


def test_a_second_live_writer_that_never_resumed_loses_to_the_first(daemon_factory: Callable[..., DaemonProc]) -> None:
    """Two writers of one rank (a misconfigured job): the second one's save of a step the first
    staged is AlreadyExists; the first one's shard is never dropped for it."""
    d = daemon_factory()
    first = CheckpointManager("tw", rank=0, world_size=2, addr=d.addr)
    second = CheckpointManager("tw", rank=0, world_size=2, addr=d.addr)
    assert first.save(1, {"x": np.full(1000, 1, dtype=np.int64)}).ok
    h = second.save(1, {"x": np.full(1000, 2, dtype=np.int64)})
    assert not h.ok and type(h.error).__name__ == "AlreadyExists", h.error
    r1 = CheckpointManager("tw", rank=1, world_size=2, addr=d.addr)
    assert r1.save(1, {"x": np.full(1000, 11, dtype=np.int64)}).ok
    r1.handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=30)
    st = {"x": np.zeros(1000, dtype=np.int64)}
    assert first.restore(st) == 1 and (st["x"] == 1).all()
    for m in (first, second, r1):
        m.close()
