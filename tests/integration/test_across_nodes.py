"""LOCAL_DURABLE of a multi-node step is a commit across nodes: it is reached only when every
node's ranks are on that node's disk (each node reports its part to the step's coordinator).

Three daemons stand for three nodes of two ranks each (tests/integration/test_replication.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from ckptd_client import Level

from ckptd.core.errors import TierFailed
from tests.conftest import DaemonProc
from tests.integration.test_replication import NODES, WORLD, Cluster

FAIL_MANIFEST = {"CKPTD_FAILPOINTS": "disk.manifest.before_write=eio"}


class FailingNode3(Cluster):
    """Node 3's disk refuses to commit its part of any step."""

    def start(self, node: str) -> DaemonProc:
        env = FAIL_MANIFEST if node == "n3" else None
        self.nodes[node] = self.factory(config_text=self.config(node), env=env)
        return self.nodes[node]


def test_local_durable_waits_for_every_node(daemon_factory: Callable[..., DaemonProc]) -> None:
    c = Cluster(daemon_factory, None, "")
    for n in NODES:
        c.start(n)
    c.save_all(1)
    c.wait(1, Level.LOCAL_DURABLE)
    logs = [c.nodes[n].log_path.read_text() for n in NODES]
    assert any(f"LOCAL_DURABLE on all {WORLD} ranks" in text for text in logs)  # said by every node once done
    assert all(f"LOCAL_DURABLE on all {WORLD} ranks" in text for text in logs)


def test_one_node_failing_its_disk_part_fails_the_level_everywhere(daemon_factory: Callable[..., DaemonProc]) -> None:
    c = FailingNode3(daemon_factory, None, "")
    for n in NODES:
        c.start(n)
    c.save_all(1)
    for rank in (0, 2):  # nodes 1 and 2 committed their own part; the level still fails, naming node 3's ranks
        with c.manager(rank) as m, pytest.raises(TierFailed) as info:
            m._wait(1, Level.LOCAL_DURABLE, 60)
        assert "[4, 5]" in str(info.value), str(info.value)
        with c.manager(rank) as m:
            status = m._wait(1, Level.STAGED, 10)
            disk = {t.tier: t.state for t in status.tiers}["disk"]
            assert disk == 3 and status.level < int(Level.LOCAL_DURABLE)  # node part COMMITTED, level not reached
    with c.manager(4) as m, pytest.raises(TierFailed, match="disk tier failed"):
        m._wait(1, Level.LOCAL_DURABLE, 60)
