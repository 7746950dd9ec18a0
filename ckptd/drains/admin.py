"""Retention by hand inside the daemon: remove a step's copies, pin steps, run retention now.

Behind the DeleteStep, PinStep and RunRetention RPCs (``ckptctl rm``, ``pin``/``unpin``, ``gc``).
``StepAdmin`` owns the daemon's ``PinStore`` (``{root}/pins/{job}.json``, loaded at start-up) and
hands its dict to disk retention (``DiskDrainer.operator_pins``) and object retention
(``ObjectUploader.operator_pins``), so a pinned step is never removed by retention.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptd.core.errors import CkptdError, InvalidArgument, NotFound, TierFailed
from ckptd.core.types import TierName, validate_job, validate_step
from ckptd.drains.pins import PINS_DIRNAME, PinStore
from ckptd.drains.retention import last_copy_refusal, select_for_deletion
from ckptd.memory.catalog import TierState

if TYPE_CHECKING:
    from ckptd.daemon.wiring import Daemon

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

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.pins = PinStore(daemon.cfg.daemon.root / PINS_DIRNAME)
        self.pins.load()
        daemon.drainer.operator_pins = self.pins.pins
        if daemon.uploader is not None:
            daemon.uploader.operator_pins = self.pins.pins
        self._pin_lock = asyncio.Lock()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.d.executor, fn, *args)

    def _tier_on(self, tier: str) -> bool:
        return {"memory": True, "disk": self.d.disk is not None, "object": self.d.object is not None}[tier]

    async def copies(self, job: str) -> tuple[dict[int, set[str]], list[str]]:
        """Every step of ``job`` with a committed copy -> the tiers holding one; plus the tiers
        that could not be listed."""
        out: dict[int, set[str]] = {}
        for st in self.d.catalog.steps(job):
            if st.in_memory:
                out.setdefault(st.step, set()).add("memory")
        if self.d.disk is not None:
            for s in await self._run(self.d.disk.list_committed, job):
                out.setdefault(s, set()).add("disk")
        problems: list[str] = []
        if self.d.object is not None:
            try:
                for s in await self._run(self.d.object.list_committed, job):
                    out.setdefault(s, set()).add("object")
            except CkptdError as exc:
                problems.append(f"object: cannot list the steps of {job}: {exc}")
        return out, problems

    def busy(self, job: str, step: int, tiers: list[str]) -> str | None:
        """Why the step's copies must not be removed now (it is in flight), or None."""
        if any((lease.job, lease.step) == (job, step) for lease in self.d.save_leases.values()):
            return f"{job}@{step} is being saved; try again when it has committed"
        st = self.d.catalog.get(job, step)
        if st is None:
            return None
        for t in TierName:
            if st.state(t) == TierState.IN_PROGRESS:
                return f"{job}@{step} is being written to the {t.value} tier; try again when it has finished"
        if "memory" in tiers and st.in_memory:
            disk_waits = self.d.disk is not None and st.state(TierName.DISK) == TierState.PENDING
            object_waits = (self.d.uploader is not None and st.state(TierName.OBJECT) == TierState.PENDING
                            and st.state(TierName.DISK) != TierState.COMMITTED)
            if disk_waits or object_waits:
                return (f"{job}@{step} is waiting in memory to be written to the "
                        f"{'disk' if disk_waits else 'object'} tier; try again when it has finished")
        return None

    async def remove(self, job: str, step: int, tier: str) -> None:
        """Remove one committed copy and record it in the catalog."""
        st = self.d.catalog.get(job, step)
        if tier == "memory":
            if st is not None:
                for rec in st.shards.values():
                    if rec.slot is not None and rec.slot.content is rec:
                        rec.slot.content = None  # the slot is free for reuse
                        await self._run(rec.slot.meta_path.unlink, True)
            await self.d.pool.notify()
        elif tier == "disk":
            assert self.d.disk is not None
            await self._run(self.d.disk.delete, job, step)
        else:
            assert self.d.object is not None
            await self._run(self.d.object.delete, job, step)
        if st is not None:
            await self.d.catalog.set_tier(st, TierName(tier), TierState.REMOVED, REMOVED_BY)

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
        if not copies and job not in self.d.catalog.jobs:
            raise NotFound(f"unknown job {job!r}")
        if tier and tier not in held:
            raise NotFound(f"{job}@{step} is not committed at tier {tier} "
                           f"(committed at: {', '.join(t for t in TIER_ORDER if t in held) or 'none'})")
        if not held:
            raise NotFound(f"{job}@{step} is not committed at any tier")
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

    # -- PinStep ------------------------------------------------------------------------------
    async def pin_step(self, job: str, step: int, pinned: bool) -> list[int]:
        _ids(job, step)
        if pinned and self.d.catalog.get(job, step) is None:
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
            policy = self.d.cfg.disk if t == "disk" else self.d.cfg.object
            result.policies.append((t, policy.max_to_keep, policy.keep_period))
            src = self.d.disk if t == "disk" else self.d.object
            assert src is not None
            for j in jobs:
                try:
                    committed: list[int] = await self._run(src.list_committed, j)
                except CkptdError as exc:
                    result.refused.append(f"{t}: cannot list the steps of {j}: {exc}")
                    continue
                found = found or bool(committed)
                keep = self.pins.get(j) | (self.d.drainer.in_use.get(j, set()) if t == "disk" else set())
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
        if job and not found and job not in self.d.catalog.jobs:
            raise NotFound(f"unknown job {job!r}")
        return result

    async def _all_jobs(self, result: AdminResult) -> list[str]:
        jobs = set(self.d.list_jobs())
        if self.d.disk is not None:
            jobs.update(await self._run(self.d.disk.list_jobs))
        if self.d.object is not None:
            try:
                jobs.update(await self._run(self.d.object.list_jobs))
            except CkptdError as exc:
                result.refused.append(f"object: cannot list jobs: {exc}")
        return sorted(jobs)
