"""Garbage collection of the object tier: mark-and-sweep from committed manifests.

Job: remove the objects no committed step needs, and never one a committed step references.
With deduplication a chunk object may be referenced by several steps (stored under the first
one's prefix), so deleting a step's objects blindly could break a later step.

Invariants:
- Mark: the keys every committed manifest of the job references, read *after* the candidates
  were listed; a step committed meanwhile is in the mark, so its objects are kept.
- Sweep: only candidates outside the mark are deleted. ``ObjectTier.delete`` un-commits the step
  first (manifest gone), then sweeps the step's own objects and the chunks its manifest
  referenced; ``job_candidates`` lists, for ``ckptctl gc``, every object of a step without a
  manifest that is older than an age limit (younger ones may be a live upload's).
- A crash anywhere leaves at worst unreferenced objects (never a committed step missing one);
  the next sweep removes them. Failpoints: ``object.gc.after_uncommit``, ``object.gc.after_delete``.
- Store errors propagate raw; the tier types them.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ckptd.core import failpoints
from ckptd.core.manifest import MANIFEST_NAME
from ckptd.tiers.object_client import Bucket
from ckptd.tiers.object_io import map_all


def sweep(store: Bucket, pool: ThreadPoolExecutor, candidates: Iterable[str],
          mark: Callable[[], set[str]]) -> list[str]:
    """Delete the candidates outside ``mark()`` (called after the candidates were listed); the
    keys deleted, in order."""
    listed = set(candidates)
    doomed = sorted(listed - mark())

    def remove(key: str) -> None:
        store.delete_key(key)
        failpoints.hit("object.gc.after_delete")

    map_all(pool, remove, doomed)
    return doomed


def job_candidates(store: Bucket, prefixes: Iterable[str], base: str, committed: set[int],
                   step_of_key: Callable[[str], int | None], older_than_s: float) -> set[str]:
    """Objects under prefixes that belong to a step without a manifest (chunks, shard objects,
    records, claims) and were last modified more than older_than_s ago (0: any age)."""
    cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=older_than_s)
    out: set[str] = set()
    for prefix in prefixes:
        for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.name, Prefix=prefix):
            for o in page.get("Contents", ()):
                key = str(o["Key"])
                step = step_of_key(key[len(base):])
                if step is None or step in committed or key.endswith("/" + MANIFEST_NAME):
                    continue
                if older_than_s <= 0 or o["LastModified"] <= cutoff:
                    out.add(key)
    return out
