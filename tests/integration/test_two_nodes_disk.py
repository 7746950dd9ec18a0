"""Two daemons standing for two nodes: each holds its own ranks (node_ranks) and commits its part
of every step on its own disk; after both daemons die and lose their shared memory, every rank
restores bit-exact from its node's disk."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import numpy as np
from ckptd_client import CheckpointManager, Level

from ckptd.core.manifest import Manifest
from tests.conftest import DaemonProc
from tests.state_factory import vector_state


def _state(step: int, rank: int) -> dict[str, object]:
    return vector_state(step * 10 + rank, 4096, step=step, rank=rank)


def test_each_node_commits_and_restores_its_own_ranks(daemon_factory: Callable[..., DaemonProc]) -> None:
    nodes = [daemon_factory(), daemon_factory()]
    managers = [CheckpointManager("twonode", rank=r, world_size=2, addr=nodes[r].addr, node_ranks=[r])
                for r in range(2)]
    for step in (1, 2, 3):
        for m in managers:
            assert m.save(step, _state(step, m.rank)).ok
    for m in managers:
        m.handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=60)
        m.close()
    for r, node in enumerate(nodes):
        manifest = Manifest.from_json((node.root / "data/twonode/step-000000000003/manifest.json").read_bytes())
        assert manifest.world_size == 2 and manifest.node_ranks == (r,)
        assert [s.rank for s in manifest.shards] == [r]
        node.kill()
        shutil.rmtree(node.shm_dir)
    restarted = [daemon_factory(root=n.root, shm_dir=n.shm_dir) for n in nodes]
    for r, node in enumerate(restarted):
        with CheckpointManager("twonode", rank=r, world_size=2, addr=node.addr, node_ranks=[r]) as m:
            got = {"w": np.zeros(4096, dtype=np.float32), "step": -1, "rank": -1}
            assert m.restore(got) == 3
            assert m.last_restore is not None and m.last_restore.served_from == "disk"
            want = _state(3, r)
            assert got["w"].tobytes() == want["w"].tobytes()  # type: ignore[union-attr]
            assert got["step"] == 3 and got["rank"] == r
