"""The coordinator side of ReportReady: ``ReadinessBoard`` merges, per (job, step, tier), the
ranks that nodes report ready or failed. A step is complete at a tier when all ``world_size``
ranks are ready there; a later report for a rank replaces an earlier one (a replacement node).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ckptd.core.errors import FailedPrecondition, NotFound, TierFailed, Timeout
from ckptd.peers.types import ReadyReport, ReadyState


@dataclass
class _StepReadiness:
    world_size: int
    ready: dict[int, str] = field(default_factory=dict)  # rank -> node
    failed: dict[int, str] = field(default_factory=dict)  # rank -> reason


class ReadinessBoard:
    """The coordinator's view of which ranks of each step reached which tier."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._steps: dict[tuple[str, int, str], _StepReadiness] = {}
        self._cond = asyncio.Condition()

    async def report(self, r: ReadyReport) -> ReadyState:
        r.validate()
        entry = self._steps.setdefault((r.job, r.step, r.tier), _StepReadiness(r.world_size))
        if entry.world_size != r.world_size:
            raise FailedPrecondition(f"step {r.step} of {r.job!r} has world_size {entry.world_size}, "
                                     f"node {r.node_id} reports {r.world_size}")
        for rank in r.ranks:
            if r.failed:
                entry.ready.pop(rank, None)
                entry.failed[rank] = f"{r.node_id}: {r.message}"
            else:
                entry.failed.pop(rank, None)
                entry.ready[rank] = r.node_id
        async with self._cond:
            self._cond.notify_all()
        return self.state(r.job, r.step, r.tier)

    def state(self, job: str, step: int, tier: str) -> ReadyState:
        e = self._steps.get((job, step, tier))
        if e is None:
            raise NotFound(f"no readiness reported for {job}@{step} at {tier}")
        return ReadyState(job, step, tier, e.world_size, tuple(sorted(e.ready)), tuple(sorted(e.failed)),
                          self.node_id, tuple(sorted(set(e.ready.values()))))

    def failures(self, job: str, step: int, tier: str) -> dict[int, str]:
        e = self._steps.get((job, step, tier))
        return dict(e.failed) if e else {}

    async def wait_complete(self, job: str, step: int, tier: str, timeout_s: float) -> ReadyState:
        """Wait until every rank is ready at the tier; TierFailed as soon as one rank failed."""
        def settled() -> bool:
            e = self._steps.get((job, step, tier))
            return e is not None and (len(e.ready) == e.world_size or bool(e.failed))
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(settled), timeout_s)
            except TimeoutError:
                raise Timeout(f"{job}@{step} not ready at {tier} on every rank in {timeout_s}s") from None
        failed = self.failures(job, step, tier)
        if failed:
            raise TierFailed(f"{job}@{step} will not be complete at {tier}: "
                             + "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items())))
        return self.state(job, step, tier)

    def newest_complete(self, job: str, tier: str) -> int | None:
        steps = [s for (j, s, t), e in self._steps.items() if j == job and t == tier
                 and len(e.ready) == e.world_size]
        return max(steps) if steps else None

    def forget(self, job: str, step: int) -> None:
        for key in [k for k in self._steps if k[0] == job and k[1] == step]:
            del self._steps[key]
