"""Retention policy per tier: which committed steps to delete. Pure functions, no I/O.

Rules: keep the newest ``max_to_keep`` committed steps, every step divisible by ``keep_period``
(when > 0), and every pinned step; never select the newest committed step, whatever the
arguments say.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


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
