"""How the ranks of a job agree on the step they resume from (torch.distributed, any backend).

``agree_latest`` gathers every rank's newest restorable step and picks the oldest of them, so
ranks whose nodes hold different newest steps never resume from different steps; a job where
some ranks have a checkpoint and others none gets a clear error. ``restore_agreed`` restores that
step on every rank; while some rank has no valid copy of it, every rank moves together to the
newest older step all of them hold (unless ``strict_latest``), so a corrupt newest step never
splits the job. Both are collective: every rank of the group must call them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ckptd.core.errors import FailedPrecondition, IntegrityError

log = logging.getLogger("ckptd_client")


def agree_latest(dist: Any, world_size: int, job: str, mine: int | None) -> int:
    """The step every rank resumes from: the oldest of the ranks' newest restorable steps; -1
    when no rank has a checkpoint. Raises FailedPrecondition when some ranks have one and others
    have none: resuming would mix a fresh start with restored ranks."""
    gathered: list[int | None] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    missing = [r for r, s in enumerate(gathered) if s is None]
    if len(missing) == world_size:
        return -1
    if missing:
        raise FailedPrecondition(
            f"ranks {missing} of {job!r} have no restorable checkpoint while others do "
            f"(newest per rank: {gathered}); restore an explicit step or start fresh")
    return min(s for s in gathered if s is not None)


def restore_agreed(dist: Any, world_size: int, job: str, agreed: int, strict_latest: bool,
                   restore_step: Callable[[int], object],
                   latest_below: Callable[[int], int | None]) -> tuple[int, list[int]]:
    """Restore ``agreed`` on every rank (``restore_step``); return (the step all ranks restored,
    the newer steps skipped because some rank had no valid copy of them)."""
    unusable: list[int] = []
    while True:
        error: IntegrityError | None = None
        other: Exception | None = None  # e.g. a strict restore's mismatch: no fallback, but every rank hears
        try:
            restore_step(agreed)
        except IntegrityError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank heard of it
            other = exc
        oks: list[str | None] = [None] * world_size
        dist.all_gather_object(oks, "ok" if error is None and other is None else "integrity" if other is None
                               else "other")
        failed = [r for r, ok in enumerate(oks) if ok == "other"]
        if failed:
            raise other or FailedPrecondition(f"the restore of step {agreed} of {job!r} failed on rank(s) {failed}")
        bad = [r for r, ok in enumerate(oks) if ok != "ok"]
        if not bad:
            if unusable:
                log.error("ckptd: %s: no valid copy of step(s) %s on every rank; all ranks resumed from step %d",
                          job, unusable, agreed)
            return agreed, unusable
        if strict_latest:
            raise error or IntegrityError(f"rank(s) {bad} of {job!r} have no valid copy of step {agreed}")
        unusable.append(agreed)
        older: list[int | None] = [None] * world_size
        dist.all_gather_object(older, latest_below(agreed))
        if any(s is None for s in older):
            raise IntegrityError(f"no valid copy of step(s) {unusable} of {job!r} on rank(s) {bad}, and no "
                                 f"older step every rank holds (newest older per rank: {older})")
        agreed = min(s for s in older if s is not None)
