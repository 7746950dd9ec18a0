"""This node's place among its peers: the membership, the replicator that follows it, and the
hooks the disk drain calls for a step that spans nodes.

``Membership`` is handed the peer directory (static members from config or ``CKPTD_PEERS``, or
none until the job sends them), whether membership is static, the replication factor, the
catalog and slot pool the replicator reads, the shutdown flag and the address peers dial. It
owns the replicator: built at once when there are members to replicate to, else when the job's
SetPeers or the cluster's discovery (ckptd/peers/discovery.py, built from the factory handed in,
owned and stopped here) first names some. It owns the cross-node commits of LOCAL_DURABLE too
(``disk_across_nodes``), each a task that ``stop`` cancels and awaits.

Invariants: SetPeers is refused while membership is static or discovered, or when the list does not name this
node; a step's disk write waits for this node's push of it at most ``drain_wait_s`` and never
once the daemon is draining (replication first, docs/architecture.md); nothing here outlives
``stop``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ckptd.core.config.peers import PeerAddr, parse_peers, split_target_host
from ckptd.core.errors import FailedPrecondition, InvalidArgument
from ckptd.core.types import TierName
from ckptd.drains.tasks import Shutdown, TaskSet
from ckptd.memory.catalog import Catalog, StepState
from ckptd.memory.slots import SlotPool
from ckptd.peers.discovery import PeerDiscovery
from ckptd.peers.replicator import PeerDirectory, Replicator, commit_across_nodes
from ckptd.peers.types import ReadyReport

log = logging.getLogger("ckptd.daemon")  # the daemon's logger: operators filter on it


class Membership:
    """The job's peers as this node sees them, and the replication that follows them."""

    def __init__(self, directory: PeerDirectory, static: bool, replication_factor: int, catalog: Catalog,
                 pool: SlotPool, shutdown: Shutdown, drain_wait_s: float, advertise: str,
                 failure_domain: str,
                 discovery: Callable[[Callable[[tuple[PeerAddr, ...]], None]], PeerDiscovery] | None = None) -> None:
        self.directory = directory
        # membership from the cluster: the factory is handed the callback that applies each new list
        self.discovery = discovery(self._discovered) if discovery is not None else None
        self.static = static or self.discovery is not None  # then SetPeers (membership from the job) is refused
        self.replication_factor = replication_factor
        self.catalog = catalog
        self.pool = pool
        self.shutdown = shutdown
        self.drain_wait_s = drain_wait_s
        self.advertise = advertise
        self.failure_domain = failure_domain
        self._commits = TaskSet()  # cross-node commits of LOCAL_DURABLE: cancelled at stop
        self._started = False
        self.replicator: Replicator | None = None
        if replication_factor > 0 and directory.addrs:
            self.replicator = Replicator(catalog, pool, directory)

    @property
    def node_id(self) -> str:
        return self.directory.node_id

    def identity(self) -> tuple[str, str]:
        """(node id, address peers dial) of this daemon."""
        return self.node_id, split_target_host(self.advertise)

    def start(self) -> None:
        self._started = True
        if self.discovery is not None:
            self.discovery.start()
        if self.replicator is not None:
            self.replicator.start()
            self.replicator.kick()

    def kick(self) -> None:
        """There may be a step to replicate (staged, or restored: top up its replicas)."""
        if self.replicator is not None:
            self.replicator.kick()

    def set_peers(self, entries: list[str]) -> list[str]:
        """The job's membership from its clients (SetPeers); replication starts if it had no peers."""
        if self.static:
            raise FailedPrecondition("this daemon's peers are configured statically or discovered from the "
                                     "cluster (peers.peers, CKPTD_PEERS or peers.discovery)")
        addrs = parse_peers(list(entries), "SetPeers.peers")
        if self.node_id not in {a.node_id for a in addrs}:
            raise InvalidArgument(f"SetPeers: the list does not name this node ({self.node_id!r})")
        log.info("peer membership set by the job: %s", ", ".join(f"{a.node_id}={a.target}" for a in addrs))
        self._apply(addrs)
        return sorted(a.node_id for a in addrs)

    def _discovered(self, addrs: tuple[PeerAddr, ...]) -> None:
        """The cluster's membership changed (peers/discovery.py); this node is always a member."""
        self._apply(addrs)

    def _apply(self, addrs: tuple[PeerAddr, ...]) -> None:
        self.directory.set_members(addrs)
        if self.replicator is None and self.replication_factor > 0 and self.directory.addrs:
            self.replicator = Replicator(self.catalog, self.pool, self.directory)
            if self._started:
                self.replicator.start()
        self.kick()

    async def before_drain(self, st: StepState) -> None:
        """Replication first: a step's disk write waits (at most ``drain_wait_s``) until this
        node's push of it ended. Both read the same slot and, on a node short of cores, a disk
        write beside the push slowed REPLICATED while the write itself gains little from
        starting early (docs/architecture.md, "Replication first")."""
        rep = self.replicator
        if rep is not None and self.drain_wait_s > 0:
            await self.catalog.wait_until(lambda: self.shutdown.draining or rep.push_settled(st), self.drain_wait_s)

    def disk_across_nodes(self, st: StepState, ok: bool, reason: str) -> None:
        """LOCAL_DURABLE of a multi-node step is global: report this node's part to the step's
        coordinator and, if it committed, clear the wait once every rank is on some node's disk."""
        peers = self.directory
        report = ReadyReport(st.job, st.step, st.world_size, "disk", peers.node_id, st.ranks, not ok, reason[:500])

        async def run() -> None:
            why = await commit_across_nodes(peers, report, peers.commit_timeout_s)
            if not ok:
                return
            if why is None:
                st.across_nodes.pop(TierName.DISK, None)
                log.info("step %s@%d LOCAL_DURABLE on all %d ranks", st.job, st.step, st.world_size)
            else:
                st.across_nodes[TierName.DISK] = why
                log.warning("step %s@%d: LOCAL_DURABLE not reached on every node: %s", st.job, st.step, why)
            await self.catalog.notify()

        self._commits.spawn(run(), f"disk-across-nodes-{st.job}-{st.step}")

    async def stop_replication(self, timeout_s: float) -> None:
        """Best effort at shutdown (disk durability is not): end discovery and the replicator, close
        the client."""
        if self.discovery is not None:
            await self.discovery.stop(timeout_s)
        if self.replicator is not None:
            await self.replicator.stop(timeout_s)
        await self.directory.client.close()

    async def cancel_commits(self) -> None:
        await self._commits.cancel()
