"""Retention policy per tier: which committed steps to delete. Pure functions, no I/O.

Rules: keep the newest ``max_to_keep`` committed steps, every step divisible by ``keep_period``
(when > 0), and every pinned step; never select the newest committed step, whatever the
arguments say. Removal by hand (``ckptctl rm``) is checked by ``last_copy_refusal``: the last
committed copy of a pinned step, or of the job's latest step, is kept unless forced.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping


def select_for_deletion(
    committed: Iterable[int],
    max_to_keep: int,
    keep_period: int = 0,
    pinned: Collection[int] = (),
) -> list[int]:
    """Committed steps that retention removes, oldest first."""
    steps = sorted(set(committed))
    if not steps:
        return []
    keep = set(steps[-max(1, max_to_keep) :])
    keep.add(steps[-1])
    if keep_period > 0:
        keep.update(s for s in steps if s % keep_period == 0)
    keep.update(pinned)
    return [s for s in steps if s not in keep]


def last_copy_refusal(
    job: str,
    step: int,
    copies: Mapping[int, Collection[str]],
    removing: Collection[str],
    pinned: Collection[int] = (),
) -> str | None:
    """Why removing the copies at tiers ``removing`` of ``step`` needs ``--force``, or None.

    ``copies`` maps every step of the job to the tiers holding a committed copy of it. Refused:
    removing every remaining copy of a pinned step, or of the latest step (the newest step with
    any copy).
    """
    held = set(copies.get(step, ()))
    if not held or held - set(removing):
        return None
    latest = max((s for s, tiers in copies.items() if tiers), default=None)
    why = [w for w, hit in (("pinned", step in pinned), ("the latest committed step", step == latest)) if hit]
    if not why:
        return None
    what = "copy" if len(held) == 1 else "copies"
    order = ("memory", "peer", "disk", "object")
    where = ", ".join(sorted(held, key=lambda t: (order.index(t) if t in order else len(order), t)))
    return (f"{job}@{step} is {' and '.join(why)}: removing its {what} at {where} would leave "
            "no committed copy (use --force to remove it anyway)")
