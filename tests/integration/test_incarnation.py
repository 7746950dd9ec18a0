"""A restarted job never mixes shards of a dead run into a step of the new run.

Rank 0 stages step 3, rank 1 dies before it does: step 3 is partial and never committed. The job
restores step 2 and saves step 3 again with different bytes: the committed step 3 must hold the
new run's shards only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ckptd_client import CheckpointManager, Level

from tests.conftest import DaemonProc


def test_partial_step_of_dead_run_is_dropped_on_restore(daemon_factory: Callable[..., DaemonProc]) -> None:
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
