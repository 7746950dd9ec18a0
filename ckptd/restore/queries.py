"""What the daemon holds: a step's status, waiting for a durability level, the steps and jobs
listed, and a step's manifest (the GetStepStatus, WaitStep, ListSteps, ListJobs and GetManifest
RPCs).

``StepQueries`` is handed the catalog, the restorer (which derives "latest" from committed
steps), the disk tier and the executor, and ``tiers()``, the tiers this daemon runs now (the
peer tier appears when a job sets its peers).

Invariants: every job and step is validated before it is looked up; a manifest is served from
memory when the step is complete there, else read from the disk tier where committed; a step
committed nowhere is NotFound, never a partial manifest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

from ckptd.core.errors import FailedPrecondition, InvalidArgument, NotFound
from ckptd.core.manifest import Manifest
from ckptd.core.types import LEVEL_TIER, Level, TierName, validate_job, validate_step
from ckptd.memory.catalog import Catalog, StepState, TierState
from ckptd.restore.planner import Restorer
from ckptd.tiers.disk import DiskTier


class StepQueries:
    """The read side of the catalog, as the gRPC servicer asks it."""

    def __init__(self, catalog: Catalog, restorer: Restorer, disk: DiskTier | None, executor: Executor,
                 tiers: Callable[[], list[str]]) -> None:
        self.catalog = catalog
        self.restorer = restorer
        self.disk = disk
        self.executor = executor
        self.tiers = tiers

    def step_status(self, job: str, step: int) -> StepState:
        try:
            validate_job(job)
            validate_step(step)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return self.catalog.require(job, step)

    async def wait_step(self, job: str, step: int, level: Level, timeout_s: float) -> StepState:
        self.step_status(job, step)
        if LEVEL_TIER[level].value not in self.tiers():
            raise FailedPrecondition(f"{level.name} needs the {LEVEL_TIER[level].value} tier, "
                                     "which this daemon does not run")
        return await self.catalog.wait_level(job, step, level, timeout_s)

    def list_steps(self, job: str) -> list[StepState]:
        try:
            validate_job(job)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if job not in self.catalog.jobs:
            raise NotFound(f"unknown job {job!r}")
        return [s for s in self.catalog.steps(job) if s.shards or s.tiers]

    def list_jobs(self) -> list[str]:
        return sorted(j for j, steps in self.catalog.jobs.items() if steps)

    async def get_manifest(self, job: str, step: int | None) -> tuple[Manifest, list[str]]:
        if step is None:
            step = await self.restorer.latest(job)
        st = self.step_status(job, step)
        tiers = [t.value for t in TierName if st.effective(t)[0] == TierState.COMMITTED]
        if st.in_memory:
            return st.manifest(), tiers
        if self.disk is not None and st.state(TierName.DISK) == TierState.COMMITTED:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self.disk.read_manifest, job, step), tiers
        raise NotFound(f"step {step} of {job!r} is not committed at any tier")
