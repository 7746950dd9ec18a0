"""Retention applied after a commit: the one loop the disk drainer and the object uploader share.

Job: for one job at one tier, list the committed steps, delete those the policy selects
(``retention.select_for_deletion``) and mark each deleted step REMOVED in the catalog.

Invariants:
- The newest committed step and every step in ``keep`` (operator pins, steps being uploaded) are
  never selected; ``keep`` is read after the listing, from the callers' live dicts, so a pin
  taken or an upload started meanwhile is honoured.
- A failed deletion (one of ``delete_errors``) is logged and skipped: the step stays as it was
  in the catalog and the next run tries again. A failed listing (``list_errors``) skips the run.
  Any other error propagates to the caller.
- Blocking tier calls run on the daemon's executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Executor

from ckptd.core.types import TierName
from ckptd.drains.retention import select_for_deletion
from ckptd.memory.catalog import Catalog, TierState
from ckptd.tiers.base import Tier


async def apply_retention(
    job: str,
    tier: Tier,
    tier_name: TierName,
    *,
    catalog: Catalog,
    executor: Executor,
    max_to_keep: int,
    keep_period: int,
    keep: Sequence[Mapping[str, Collection[int]]],
    delete_errors: tuple[type[Exception], ...],
    list_errors: tuple[type[Exception], ...] = (),
    forget_unless_in_memory: bool = False,
    log: logging.Logger,
) -> None:
    """Apply (max_to_keep, keep_period) to job at tier, keeping every step in ``keep[i][job]``.

    ``forget_unless_in_memory``: a removed step with no memory copy left is also dropped from
    the catalog (the disk tier: nothing else holds it locally).
    """
    loop = asyncio.get_running_loop()
    try:
        committed = await loop.run_in_executor(executor, tier.list_committed, job)
    except list_errors as exc:
        log.warning("%s retention of %s skipped: %s", tier_name, job, exc)
        return
    kept: set[int] = set().union(*(k.get(job, ()) for k in keep))
    for step in select_for_deletion(committed, max_to_keep, keep_period, kept):
        try:
            await loop.run_in_executor(executor, tier.delete, job, step)
        except delete_errors as exc:
            log.warning("%s retention could not delete %s@%d: %s", tier_name, job, step, exc)
            continue
        st = catalog.get(job, step)
        if st is not None:
            await catalog.set_tier(st, tier_name, TierState.REMOVED, "retention")
            if forget_unless_in_memory and not st.in_memory:
                catalog.forget(job, step)
