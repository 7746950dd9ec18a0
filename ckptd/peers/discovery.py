"""Peer membership from the cluster: the addresses a DNS name resolves to, refreshed periodically.

``peers.discovery = "dns:name:port"`` names, typically, a Kubernetes headless Service whose A/AAAA
records are the ready ckptd pods (deploy/kubernetes/base/peers-service.yaml): no Kubernetes API
access and no dependency beyond the system resolver. Every ``interval_s`` the ``PeerDiscovery``
task resolves the name (``loop.getaddrinfo`` by default; the resolver is handed in; it returns
IP addresses), pings each new address on ``port`` to learn its node id and failure domain
(PeerService.Ping, token authenticated) and re-checks at most ``verify_per_round`` known
members (in turn), and hands the resulting member list to ``on_members`` when it changed. So a
node sends O(new + verify_per_round) pings a round, not one per member: with every node of a
10,000-node cluster pinging all the others every 10 s, each would take 1,000 pings a second.

Invariants: a member is dropped only when its address left the DNS answer, or when it failed
``MISSES_TO_DROP`` of its checks in a row (a node lost before the cluster's readiness probe takes
it out of the Service; in a cluster larger than ``verify_per_round`` that takes more rounds, and
the Service's readiness usually drops it first); a failed resolution changes nothing (a DNS outage never empties the
membership); two addresses answering the same node id keep the lowest address; the task is a
``Worker`` owned by ``Membership``, stopped with it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

from ckptd.core.config.peers import DnsDiscovery, PeerAddr
from ckptd.drains.worker import Worker
from ckptd.peers.client import PeerClient

log = logging.getLogger("ckptd.daemon")

Resolver = Callable[[str, int], Awaitable[list[str]]]
MISSES_TO_DROP = 3
PING_DEADLINE_S = 2.0
VERIFY_PER_ROUND = 32  # known members pinged again per round, in turn


async def resolve_dns(name: str, port: int) -> list[str]:
    """The addresses ``name`` resolves to through the system resolver (A and AAAA), sorted."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def dial_target(address: str, port: int) -> str:
    """host:port for an address; an IPv6 literal in brackets."""
    return f"[{address}]:{port}" if ipaddress.ip_address(address).version == 6 else f"{address}:{port}"


class PeerDiscovery(Worker):
    """Owner of the discovery task: resolve, ping, hand over the members when they changed."""

    name = "peer-discovery"

    def __init__(self, target: DnsDiscovery, client: PeerClient, interval_s: float,
                 on_members: Callable[[tuple[PeerAddr, ...]], None], resolve: Resolver = resolve_dns,
                 verify_per_round: int = VERIFY_PER_ROUND) -> None:
        super().__init__()
        self.target = target
        self.client = client
        self.interval_s = interval_s
        self.on_members = on_members
        self.resolve = resolve
        self.verify_per_round = verify_per_round
        self.members: dict[str, PeerAddr] = {}  # address -> member
        self._misses: dict[str, int] = {}  # address -> checks in a row it did not answer
        self._turn = 0  # where the next round's re-checks of known members start
        self.pings = 0  # pings sent so far

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a failed refresh keeps the membership; try again later
                log.warning("peer discovery of %s failed: %s", self.target.name, exc)
            await self._wait_kick(self.interval_s)

    async def refresh(self) -> bool:
        """One round; True when the membership changed (and was handed to ``on_members``)."""
        try:
            addresses = await self.resolve(self.target.name, self.target.port)
        except OSError as exc:
            log.warning("peer discovery: cannot resolve %s: %s", self.target.name, exc)
            return False
        known = [a for a in addresses if a in self.members]
        start = self._turn % len(known) if known else 0
        recheck = set((known[start:] + known[:start])[:self.verify_per_round])
        self._turn = start + len(recheck)
        asked = [a for a in addresses if a not in self.members or a in recheck]
        self.pings += len(asked)
        answers = await asyncio.gather(*(self.client.ping(dial_target(a, self.target.port), PING_DEADLINE_S, 1)
                                         for a in asked), return_exceptions=True)
        found: dict[str, PeerAddr] = {a: self.members[a] for a in known if a not in recheck}
        for address, answer in zip(asked, answers):
            if isinstance(answer, BaseException):
                self._misses[address] = self._misses.get(address, 0) + 1
                member = self.members.get(address)
                if member is not None and self._misses[address] < MISSES_TO_DROP:
                    found[address] = member
                continue
            self._misses.pop(address, None)
            host = dial_target(address, self.target.port).rpartition(":")[0]
            found[address] = PeerAddr(answer.node_id, host, self.target.port, answer.failure_domain)
        by_node: dict[str, PeerAddr] = {}
        for address in sorted(found):
            m = found[address]
            if m.node_id in by_node:
                log.warning("peer discovery: %s and %s both answer as node %r; keeping the first",
                            by_node[m.node_id].target, m.target, m.node_id)
                continue
            by_node[m.node_id] = m
        self._misses = {a: n for a, n in self._misses.items() if a in addresses}
        kept = {a: m for a, m in found.items() if by_node.get(m.node_id) is m}
        if kept == self.members:
            return False
        self.members = kept
        members = tuple(sorted(kept.values(), key=lambda m: m.node_id))
        log.info("peer membership discovered from %s: %s", self.target.name,
                 ", ".join(f"{m.node_id}={m.target}" for m in members) or "none")
        self.on_members(members)
        return True
