"""Replication of one shard along the ring: k acknowledged copies, or a degraded outcome.

``push_to_ring`` pushes to the first k candidates of a placement order (ckptd/placement.py) at
once; each push that fails (dead, stopped, full, refusing) hands its place to the next candidate,
until k peers acknowledged or no candidate is left. Nothing here retries a peer that failed: the
caller (the daemon's replicator) reports the degraded level and tries again later, e.g. when the
peer is back or the membership changed.

Invariants: never more than k pushes run at once; every push is bounded by ``push_timeout_s``
and by the overall deadline; a cancelled call cancels and awaits every push it started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckptd.peer_client import PeerClient
from ckptd.peer_config import PeerAddr
from ckptd.peer_types import PushResult, ReplicaHeader

log = logging.getLogger("ckptd.peer")


@dataclass
class RingOutcome:
    """Who acknowledged a replica, and why the others did not."""

    k: int
    holders: dict[str, PushResult] = field(default_factory=dict)  # candidate node id -> its ack
    failures: dict[str, str] = field(default_factory=dict)  # node id -> reason

    @property
    def degraded(self) -> bool:
        return len(self.holders) < self.k


async def push_to_ring(client: PeerClient, candidates: Sequence[PeerAddr], k: int, header: ReplicaHeader,
                       view: memoryview, deadline_s: float, push_timeout_s: float | None = None) -> RingOutcome:
    """Push to the first k candidates at once; each failure hands its place to the next candidate.

    ``candidates`` is a placement order (targets first, then fallbacks: ckptd/placement.py).
    Every push gets ``push_timeout_s`` (default: all the time left), bounded by ``deadline_s``.
    """
    out = RingOutcome(k)
    deadline = time.monotonic() + deadline_s
    queue = list(candidates)
    running: dict[asyncio.Task[PushResult], PeerAddr] = {}
    try:
        while len(out.holders) < k:
            while queue and len(running) + len(out.holders) < k:
                peer = queue.pop(0)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    out.failures[peer.node_id] = "replication deadline passed before this peer was tried"
                    continue
                budget = remaining if push_timeout_s is None else min(push_timeout_s, remaining)
                running[asyncio.create_task(client.push(peer.target, header, view, budget))] = peer
            if not running:
                break
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                peer = running.pop(task)
                try:
                    out.holders[peer.node_id] = task.result()
                except Exception as exc:  # noqa: BLE001 - any failure hands the place on
                    log.warning("replica of %s@%d rank %d not held by %s: %s", header.job, header.step,
                                header.rank, peer.node_id, exc)
                    out.failures[peer.node_id] = f"{type(exc).__name__}: {exc}"
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    return out
