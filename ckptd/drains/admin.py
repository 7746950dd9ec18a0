"""Retention by hand inside the daemon: remove a step's copies, pin steps, run retention now.

Behind the DeleteStep, PinStep and RunRetention RPCs (``ckptctl rm``, ``pin``/``unpin``, ``gc``).
``StepAdmin`` is handed the catalog, the slot pool, the tiers, the retention policies, the
daemon's ``PinStore`` (``{root}/pins/{job}.json``, loaded by the wiring, whose dict disk and object
retention are handed too, so a pinned step is never removed by retention), the steps being
uploaded (which disk retention keeps) and ``saving(job, step)`` (a save lease still writes it).

Rules:
- A copy is removed only where it is committed; a step in flight (being saved, written to a tier,
  or waiting in memory for its disk drain) is refused, never raced.
- Without ``force``, the last committed copy of a pinned step or of the job's latest step (the
  newest step with a copy at any tier this daemon sees, object store included) is kept
  (``retention.last_copy_refusal``). When the object store cannot be listed, its copies count as
  absent, which only refuses more.
- A pin whose step has no copy left after ``rm --force`` is dropped with it.
- Removing the memory copy frees the step's slots for reuse (content dropped, sidecars removed);
  disk and object copies are deleted through their tiers. The catalog marks the tier REMOVED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from ckptd.core.config import DiskSection, ObjectSection
from ckptd.core.errors import CkptdError, InvalidArgument, NotFound, TierFailed
from ckptd.core.types import TierName, validate_job, validate_step
from ckptd.drains.pins import PinStore
from ckptd.drains.retention import last_copy_refusal, select_for_deletion
from ckptd.memory.catalog import Catalog, TierState
from ckptd.memory.slots import SlotPool
from ckptd.tiers.base import Tier

log = logging.getLogger("ckptd.admin")

TIER_ORDER = ("memory", "disk", "object")
REMOVED_BY = "removed by ckptctl"


@dataclass(frozen=True)
class Removal:
    """One copy removed (or, in a dry run, that would be)."""

    job: str
    step: int
    tier: str


@dataclass
class AdminResult:
    deleted: list[Removal] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # DeleteStep: refused; RunRetention: errors
    policies: list[tuple[str, int, int]] = field(default_factory=list)  # (tier, max_to_keep, keep_period)


def _ids(job: str, step: int | None = None) -> None:
    try:
        validate_job(job)
        if step is not None:
            validate_step(step)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


class StepAdmin:
    """DeleteStep / PinStep / RunRetention over one daemon's catalog and tiers."""

    def __init__(self, catalog: Catalog, pool: SlotPool, disk: Tier | None, object_tier: Tier | None,
                 executor: Executor, disk_policy: DiskSection, object_policy: ObjectSection, pins: PinStore,
                 in_upload: dict[str, set[int]], saving: Callable[[str, int], bool]) -> None:
        self.catalog = catalog
        self.pool = pool
        self.disk = disk
        self.object = object_tier
        self.executor = executor
        self.disk_policy = disk_policy
        self.object_policy = object_policy
        self.pins = pins
        self.in_upload = in_upload  # steps being uploaded: disk retention keeps them
        self.saving = saving
        self._pin_lock = asyncio.Lock()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _tier_on(self, tier: str) -> bool:
        return {"memory": True, "disk": self.disk is not None, "object": self.object is not None}[tier]

    async def copies(self, job: str) -> tuple[dict[int, set[str]], list[str]]:
        """Every step of ``job`` with a committed copy -> the tiers holding one; plus the tiers
        that could not be listed."""
        out: dict[int, set[str]] = {}
        for st in self.catalog.steps(job):
            if st.in_memory:
                out.setdefault(st.step, set()).add("memory")
        if self.disk is not None:
            for s in await self._run(self.disk.list_committed, job):
                out.setdefault(s, set()).add("disk")
        problems: list[str] = []
        if self.object is not None:
            try:
                for s in await self._run(self.object.list_committed, job):
                    out.setdefault(s, set()).add("object")
            except CkptdError as exc:
                problems.append(f"object: cannot list the steps of {job}: {exc}")
        return out, problems

    def busy(self, job: str, step: int, tiers: list[str]) -> str | None:
        """Why the step's copies must not be removed now (it is in flight), or None."""
        if self.saving(job, step):
            return f"{job}@{step} is being saved; try again when it has committed"
        st = self.catalog.get(job, step)
        if st is None:
            return None
        for t in TierName:
            if st.state(t) == TierState.IN_PROGRESS:
                return f"{job}@{step} is being written to the {t.value} tier; try again when it has finished"
        if "memory" in tiers and st.in_memory:
            disk_waits = self.disk is not None and st.state(TierName.DISK) == TierState.PENDING
            object_waits = (self.object is not None and st.state(TierName.OBJECT) == TierState.PENDING
                            and st.state(TierName.DISK) != TierState.COMMITTED)
            if disk_waits or object_waits:
                return (f"{job}@{step} is waiting in memory to be written to the "
                        f"{'disk' if disk_waits else 'object'} tier; try again when it has finished")
        return None

    async def remove(self, job: str, step: int, tier: str) -> None:
        """Remove one committed copy and record it in the catalog."""
        st = self.catalog.get(job, step)
        if tier == "memory":
            if st is not None:
                for rec in st.shards.values():
                    if rec.slot is not None and rec.slot.content is rec:
                        rec.slot.content = None  # the slot is free for reuse
                        await self._run(rec.slot.meta_path.unlink, True)
            await self.pool.notify()
        elif tier == "disk":
            assert self.disk is not None
            await self._run(self.disk.delete, job, step)
        else:
            assert self.object is not None
            await self._run(self.object.delete, job, step)
        if st is not None:
            await self.catalog.set_tier(st, TierName(tier), TierState.REMOVED, REMOVED_BY)

    # -- DeleteStep ---------------------------------------------------------------------------
    async def delete_step(self, job: str, step: int, tier: str, force: bool, dry_run: bool) -> AdminResult:
        _ids(job, step)
        if tier not in ("", *TIER_ORDER):
            raise InvalidArgument(f"unknown tier {tier!r} (memory, disk, object, or empty for every tier)")
        if tier and not self._tier_on(tier):
            raise NotFound(f"this daemon has no {tier} tier")
        copies, problems = await self.copies(job)
        if tier == "object" and problems:
            raise TierFailed(problems[0])
        held = copies.get(step, set())
        if not copies and job not in self.catalog.jobs:
            raise NotFound(f"unknown job {job!r}")
        if tier and tier not in held:
            raise NotFound(f"{job}@{step} is not committed at tier {tier} "
                           f"(committed at: {', '.join(t for t in TIER_ORDER if t in held) or 'none'})")
        if not held:
            return await self._delete_uncommitted(job, step, force, dry_run)
        targets = [tier] if tier else [t for t in TIER_ORDER if t in held]
        why = self.busy(job, step, targets)
        if why is not None:
            return AdminResult(refused=[why])
        refusal = last_copy_refusal(job, step, copies, targets, self.pins.get(job))
        if refusal is not None and not force:
            return AdminResult(refused=[refusal, *problems])
        result = AdminResult(refused=list(problems))
        for t in targets:
            if not dry_run:
                try:
                    await self.remove(job, step, t)
                except (CkptdError, OSError) as exc:
                    result.refused.append(f"{t}: removing {job}@{step} failed: {exc}")
                    continue
                log.info("removed %s@%d at the %s tier%s", job, step, t, " (forced)" if refusal else "")
            result.deleted.append(Removal(job, step, t))
        gone = len(result.deleted) == len(held) and not dry_run
        if gone and step in self.pins.get(job):  # no copy left: its pin would only go stale
            await self.pin_step(job, step, False)
        return result

    async def _delete_uncommitted(self, job: str, step: int, force: bool, dry_run: bool) -> AdminResult:
        """A step committed nowhere but with shards staged in memory (a rank never saved its part,
        or saved with another world size): only ``force`` removes it, never while a save writes it."""
        st = self.catalog.get(job, step)
        staged = [] if st is None or st.in_memory else [
            rec for rec in st.shards.values() if rec.slot is not None and rec.slot.content is rec]
        if st is None or not staged:
            raise NotFound(f"{job}@{step} is not committed at any tier")
        if self.saving(job, step):
            return AdminResult(refused=[f"{job}@{step} is being saved; try again when it has committed"])
        what = f"{job}@{step} is not committed at any tier ({len(staged)} of {st.world_size} shards staged)"
        if not force:
            return AdminResult(refused=[f"{what}; --force removes it"])
        if not dry_run:
            for rec in staged:
                assert rec.slot is not None
                rec.slot.content = None  # the slot is free for reuse
                await self._run(rec.slot.meta_path.unlink, True)
            self.catalog.forget(job, step)
            await self.pool.notify()
            log.info("removed uncommitted %s (forced)", what)
        return AdminResult(deleted=[Removal(job, step, "memory")])

    # -- PinStep ------------------------------------------------------------------------------
    async def pin_step(self, job: str, step: int, pinned: bool) -> list[int]:
        _ids(job, step)
        if pinned and self.catalog.get(job, step) is None:
            copies, _ = await self.copies(job)
            if step not in copies:
                raise NotFound(f"{job}@{step} is not committed at any tier")
        async with self._pin_lock:
            steps: list[int] = await self._run(self.pins.change, job, step, pinned)
        log.info("%s %s@%d", "pinned" if pinned else "unpinned", job, step)
        return steps

    # -- RunRetention -------------------------------------------------------------------------
    async def run_retention(self, job: str, tier: str, dry_run: bool) -> AdminResult:
        if job:
            _ids(job)
        if tier == "memory":
            raise InvalidArgument("the memory tier has no retention policy (slots are reused by newer saves)")
        if tier not in ("", "disk", "object"):
            raise InvalidArgument(f"unknown tier {tier!r} (disk, object, or empty for both)")
        if tier and not self._tier_on(tier):
            raise NotFound(f"this daemon has no {tier} tier")
        tiers = [t for t in ("disk", "object") if self._tier_on(t) and tier in ("", t)]
        result = AdminResult()
        jobs = [job] if job else await self._all_jobs(result)
        found = False
        for t in tiers:
            policy = self.disk_policy if t == "disk" else self.object_policy
            result.policies.append((t, policy.max_to_keep, policy.keep_period))
            src = self.disk if t == "disk" else self.object
            assert src is not None
            for j in jobs:
                try:
                    committed: list[int] = await self._run(src.list_committed, j)
                except CkptdError as exc:
                    result.refused.append(f"{t}: cannot list the steps of {j}: {exc}")
                    continue
                found = found or bool(committed)
                keep = self.pins.get(j) | (self.in_upload.get(j, set()) if t == "disk" else set())
                for s in select_for_deletion(committed, policy.max_to_keep, policy.keep_period, keep):
                    why = self.busy(j, s, [t])
                    if why is not None:
                        result.refused.append(why)
                        continue
                    if not dry_run:
                        try:
                            await self.remove(j, s, t)
                        except (CkptdError, OSError) as exc:
                            result.refused.append(f"{t}: removing {j}@{s} failed: {exc}")
                            continue
                        log.info("retention (by hand) removed %s@%d at the %s tier", j, s, t)
                    result.deleted.append(Removal(j, s, t))
        if job and not found and job not in self.catalog.jobs:
            raise NotFound(f"unknown job {job!r}")
        return result

    async def _all_jobs(self, result: AdminResult) -> list[str]:
        jobs = {j for j, steps in self.catalog.jobs.items() if steps}
        if self.disk is not None:
            jobs.update(await self._run(self.disk.list_jobs))
        if self.object is not None:
            try:
                jobs.update(await self._run(self.object.list_jobs))
            except CkptdError as exc:
                result.refused.append(f"object: cannot list jobs: {exc}")
        return sorted(jobs)
