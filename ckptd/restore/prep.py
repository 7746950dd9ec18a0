"""Restore slots prepared at start-up, for a daemon that comes up empty on a replicated job's node.

A node that lost its RAM and disk (a replacement node, a reboot that wiped /dev/shm) restores its
ranks from peers. The transfer itself runs at network speed, but every byte must land in memory
that does not exist yet, and allocating and mapping it costs more than the transfer: 512 MiB from
a peer took 0.77 s into a new slot against 0.35 s into a prepared one (docs/architecture.md,
"Measured"). A trainer takes longer than that to start, so the daemon does that work first:
right after start-up it asks every reachable peer what it holds of the shards this node was the
source of (``ListHoldings``), and for each (job, rank) whose newest step it holds no copy of,
allocates a scratch slot of that size and faults its pages into its own mapping. The restore's
scratch lease then finds a slot of the right size already mapped, so a peer restore costs the
transfer. Each prepared slot is remembered for its (job, rank): that rank's restore takes it
first, and DaemonStatus lists it, so the rank's client can map it ahead of the restore too
(client/ckptd_client/restore/premap.py) instead of faulting the mapping in during the copy.

Invariants: preparation never waits for room and never takes more than ``MAX_BUDGET_FRACTION``
of the slot budget, so it cannot starve a save; a prepared slot holds nothing (``content`` is
None), so any lease, a save's included, may take it; an unreachable peer or a failed allocation
is logged, never fatal; the task is owned by ``RestorePrep`` (started by the daemon's ``start``,
cancelled and awaited by its ``stop``) and the blocking page faulting runs in the executor.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Final

from ckptd.core.errors import CkptdError
from ckptd.memory.catalog import Catalog
from ckptd.memory.slots import Slot, SlotPool, populate
from ckptd.peers.replicator import PeerDirectory
from ckptd.peers.types import Holding

log = logging.getLogger("ckptd.daemon")
MAX_BUDGET_FRACTION: Final = 0.5
HOLDINGS_DEADLINE_S: Final = 5.0


def wanted(own: list[Holding], has_copy: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """(job, rank) -> bytes of its newest complete step, for shards this node has no copy of."""
    newest: dict[tuple[str, int], Holding] = {}
    for h in own:
        if not h.step_complete:
            continue
        cur = newest.get((h.job, h.rank))
        if cur is None or h.step > cur.step:
            newest[(h.job, h.rank)] = h
    return {key: h.nbytes for key, h in sorted(newest.items()) if key not in has_copy and h.nbytes > 0}


class RestorePrep:
    """The start-up task that prepares restore slots, and how many it prepared so far."""

    def __init__(self, peers: PeerDirectory, catalog: Catalog, pool: SlotPool, executor: Executor,
                 prepared: dict[tuple[str, int], str]) -> None:
        self.peers = peers
        self.catalog = catalog
        self.pool = pool
        self.executor = executor
        self.prepared = prepared  # (job, rank) -> slot id: that rank's restore takes it first
        self.count = 0
        self._task: asyncio.Task[int] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="prepare-restore-slots")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run(self) -> int:
        """Prepare scratch slots for this node's shards held by peers; return how many (never
        raises but on cancel: a failure only costs the restore its head start)."""
        try:
            return await self._prepare()
        except Exception as exc:  # noqa: BLE001
            log.warning("restore slots not prepared: %s", exc)
            return 0

    async def _prepare(self) -> int:
        me = self.peers.node_id
        by_peer = await self.peers.holdings("", HOLDINGS_DEADLINE_S)
        own = [h for holdings in by_peer.values() for h in holdings if h.source_node == me]
        has_copy = {(job, rank) for job, steps in self.catalog.jobs.items() for st in steps.values()
                    for rank, rec in st.shards.items() if rec.slot is not None}
        need = wanted(own, has_copy)
        room = int(self.pool.budget_bytes * MAX_BUDGET_FRACTION)
        loop = asyncio.get_running_loop()
        held: list[Slot] = []  # leased (writing) until all are prepared, so no lease here takes one twice
        try:
            for (job, rank), nbytes in need.items():
                if nbytes > room:
                    log.info("restore slot for %s rank %d (%d bytes) not prepared: over the preparation "
                             "share of the budget", job, rank, nbytes)
                    continue
                try:
                    slot = await self.pool.lease_scratch(nbytes, False, 0.0)
                except CkptdError as exc:
                    log.info("restore slot for %s rank %d not prepared: %s", job, rank, exc)
                    continue
                held.append(slot)
                await loop.run_in_executor(self.executor, populate, slot)
                room -= slot.capacity
                self.count += 1
                self.prepared[(job, rank)] = slot.slot_id  # that rank's restore takes it first
        finally:
            for slot in held:
                slot.writing = False  # free, empty: a restore's scratch lease (or any lease) takes it
            await self.pool.notify()
        prepared = len(held)
        if need:
            log.info("prepared %d restore slot(s) for this node's shards held by peers (%s)", prepared,
                     ", ".join(f"{job} rank {rank}" for job, rank in need))
        return prepared
