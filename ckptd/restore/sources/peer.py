"""The peer source: a rank's shard held by another node's daemon (its replica or its own copy).

The peer directory may not exist when the source is built and its members change at runtime
(SetPeers): the source holds a callable that returns the current directory (None while peer
replication is off, then the source holds nothing). Surveying asks the reachable peers what they
hold of the job (an unreachable peer is absent) and lists a rank's complete copies in placement
order. Up to ``ask_all_up_to`` peers it asks every one; beyond, the rank's first placement
candidates (k + 1 + ``SPARE_CANDIDATES``: its replicas' targets, its own node seen from another,
and a few for members that joined since) and everyone only when none of them holds a copy. A
restore in a 10,000-node cluster would otherwise send 9,999 ListHoldings, and a whole job
restarting would make every node answer N x ranks of them (docs/scale.md). The fetch lands in a
scratch slot leased once the peer's header names the size, verified by the peer client chunk by
chunk, and the slot becomes the shard's memory copy (re-warm). A ranged restore asks the peer for
the integrity chunks covering its ranges alone (peers/ranged.py); that slot is no memory copy.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptd.core.manifest import ReplicaHeader
from ckptd.core.types import TierName
from ckptd.memory.catalog import Catalog
from ckptd.memory.slots import Slot
from ckptd.peers.replicator import PeerDirectory
from ckptd.peers.types import FileBacked
from ckptd.restore.sources.base import Copy, Filled, PlanDraft, Reading, Source, Survey

ASK_ALL_UP_TO = 32  # members: a survey of a larger membership asks the rank's placement candidates first
SPARE_CANDIDATES = 4


class PeerSource:
    tier = TierName.PEER
    distance = 2

    def __init__(self, peers: Callable[[], PeerDirectory | None], catalog: Catalog,
                 ask_all_up_to: int = ASK_ALL_UP_TO) -> None:
        self.peers = peers
        self.catalog = catalog
        self.ask_all_up_to = ask_all_up_to

    async def survey(self, job: str, rank: int | None) -> Survey:
        peers = self.peers()
        if peers is None or rank is None:
            return Survey(frozenset())
        order = [p.node_id for p in peers.order(job, rank, peers.node_id)]
        if len(peers.addrs) > self.ask_all_up_to:
            held = await peers.holdings(job, only=order[:peers.k + 1 + SPARE_CANDIDATES])
            if not any(h.rank == rank and h.step_complete for hs in held.values() for h in hs):
                held = await peers.holdings(job)  # placement moved under it, or a degraded push: ask all
        else:
            held = await peers.holdings(job)
        copies: dict[int, list[Copy]] = {}
        for node in sorted(held, key=lambda n: order.index(n) if n in order else len(order)):
            for h in held[node]:
                if h.rank == rank and h.step_complete:
                    copies.setdefault(h.step, []).append(Copy(node, f"{node} {'/'.join(h.tiers)}", h.world_size))
        return Survey(frozenset(copies), {step: tuple(c) for step, c in copies.items()})

    async def plan(self, survey: Survey, draft: PlanDraft) -> None:
        for copy in survey.copies.get(draft.step, ()):
            draft.saw_world_size(copy.world_size)
            draft.add(self, copy.detail, key=copy.key)

    async def read_into(self, planned: Source, reading: Reading) -> Filled:
        peers = self.peers()
        assert peers is not None  # planned only from a survey of the directory
        peer = peers.addrs[planned.key]
        slots: list[Slot] = []

        async def lease(h: ReplicaHeader) -> memoryview | FileBacked:
            slot = await reading.lease(TierName.PEER, h.entry, h.nbytes)
            slots.append(slot)
            # a new slot's pages are not mapped in here yet: the bytes go through its file (slots.py)
            return FileBacked(slot.view(h.nbytes), slot.path) if slot.fresh else slot.view(h.nbytes)

        try:
            res = await peers.client.fetch_into(peer.target, reading.job, reading.step, reading.rank, lease,
                                                peers.fetch_timeout_s, reading.on_verified, reading.ranges)
        except BaseException:
            for s in slots:
                await reading.discard(s)
            raise
        h, slot = res.header, slots[0]
        st = self.catalog.ensure(reading.job, reading.step, h.world_size)
        st.extra = dict(h.extra)
        st.created_unix_s = h.created_unix_s
        if not st.shards:
            st.node_ranks = h.node_ranks
        return Filled(h.entry, slot, st)
