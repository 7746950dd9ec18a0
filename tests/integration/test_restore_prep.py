"""A daemon that starts empty on a replicated job's node prepares its restore slots.

Three daemons stand for three nodes of two ranks each (tests/integration/test_replication.py).
Node 2 is lost (daemon SIGKILLed, root and shm dir wiped) and a fresh daemon starts in its place:
before any restore it has allocated one slot per rank of node 2 whose replica a peer holds, of
that shard's size (DaemonStatus.restore_slots_prepared); the restores then take those slots (no
new slot is created) and are served from the peers bit-exact. DaemonStatus lists each prepared
slot with its rank, and each rank's client maps its own ahead (client restore/premap.py): the restore
hands that very mapping over, which proves the daemon filled the rank's own prepared slot. Those
slots then hold the re-warmed memory copies, listed the same way, so a trainer restarting next
restores from RAM through a mapping made ahead too. With
``prepare_restore = false`` nothing is prepared and the restores allocate their own slots.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from ckptd_client import Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from ckptd.peers.types import Holding
from ckptd.restore.prep import wanted
from tests.conftest import DaemonProc
from tests.fault.faultkit import wait_until
from tests.integration.test_replication import NODES, Cluster, N, _check


class PrepCluster(Cluster):
    def __init__(self, factory: Callable[..., DaemonProc], prepare: bool) -> None:
        super().__init__(factory, None, "")
        self.prepare = prepare

    def config(self, node: str) -> str:
        return super().config(node) + f"prepare_restore = {'true' if self.prepare else 'false'}\n"


def _status(d: DaemonProc) -> pb.DaemonStatusResponse:
    with grpc.insecure_channel(f"unix:{d.addr}") as ch:
        resp: pb.DaemonStatusResponse = pb_grpc.CheckpointServiceStub(ch).DaemonStatus(
            pb.DaemonStatusRequest(), timeout=10)
        return resp


def _lose_node2(factory: Callable[..., DaemonProc], prepare: bool) -> PrepCluster:
    c = PrepCluster(factory, prepare)
    for n in NODES:
        c.start(n)
    for step in (1, 2):
        c.save_all(step)
        c.wait(step, Level.REPLICATED)
    c.wipe("n2")
    c.start("n2")
    wait_until(lambda: not _status(c.nodes["n2"]).preparing_restore, 30, "n2 prepared its restore slots")
    return c


def test_a_fresh_node_prepares_one_slot_per_rank_and_its_restores_use_them(
        daemon_factory: Callable[..., DaemonProc]) -> None:
    c = _lose_node2(daemon_factory, prepare=True)
    st = _status(c.nodes["n2"])
    assert st.restore_slots_prepared == 2 and st.slots == 2 and st.slots_busy == 0
    assert st.slot_bytes_in_use >= 2 * 4 * N  # one float32 array of N per rank, slot-aligned
    listed = {(s.job, s.rank): s.slot_path for s in st.restore_slots}
    assert set(listed) == {(c.job, 2), (c.job, 3)} and len(set(listed.values())) == 2
    assert all(s.prepared for s in st.restore_slots)
    for rank in (3, 2):  # rank 3 first: without its own slot preferred it could take rank 2's
        with c.manager(rank) as m:
            premap = m._premap
            assert premap is not None and m.warm_restore(10)
            assert _check(m, 2) == "peer"
            assert premap.taken == 1  # the restore filled the slot prepared for this rank
            assert m._premap is None  # dropped after the restore
    st = _status(c.nodes["n2"])
    assert st.slots == 2  # the restores took the prepared slots
    # ... and those slots now hold the re-warmed memory copies: a trainer restarting next maps
    # its rank's ahead and restores from RAM through that mapping
    assert {(s.job, s.rank, s.step, s.prepared) for s in st.restore_slots} == {(c.job, 2, 2, False),
                                                                            (c.job, 3, 2, False)}
    with c.manager(2) as m:
        premap = m._premap
        assert premap is not None and m.warm_restore(10)
        assert _check(m, 2) == "memory"
        assert premap.taken == 1


def test_without_preparation_the_restores_allocate_their_own(daemon_factory: Callable[..., DaemonProc]) -> None:
    c = _lose_node2(daemon_factory, prepare=False)
    st = _status(c.nodes["n2"])
    assert st.restore_slots_prepared == 0 and st.slots == 0 and not st.restore_slots
    for rank in (2, 3):
        with c.manager(rank) as m:
            assert not m.warm_restore(10)  # nothing prepared, nothing mapped ahead
            assert _check(m, 2) == "peer"
    assert _status(c.nodes["n2"]).slots == 2


def test_wanted_takes_the_newest_complete_step_of_each_rank_without_a_copy() -> None:
    def h(job: str, step: int, rank: int, nbytes: int, complete: bool = True) -> Holding:
        return Holding(job, step, rank, 4, nbytes, ("memory",), complete, "n2")

    own = [h("a", 1, 0, 10), h("a", 2, 0, 20), h("a", 3, 0, 30, complete=False), h("a", 2, 1, 5),
           h("b", 7, 0, 0), h("c", 1, 2, 8)]
    assert wanted(own, {("c", 2)}) == {("a", 0): 20, ("a", 1): 5}
