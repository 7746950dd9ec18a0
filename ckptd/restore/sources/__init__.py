"""Restore sources: where a rank's shard can be restored from, one module per place.

``base`` holds the ``RestoreSource`` protocol and what the sources share; ``memory``, ``disk``,
``peer`` and ``object`` implement it once each. ``default_sources`` builds the sources a daemon
has, in the order the planner asks them (nearest first): memory, disk, peers, object store.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

from ckptd.memory.catalog import Catalog
from ckptd.memory.slots import SlotPool
from ckptd.peers.replicator import PeerDirectory
from ckptd.restore.sources.base import RestoreSource, Source
from ckptd.restore.sources.disk import DiskSource
from ckptd.restore.sources.memory import MemorySource
from ckptd.restore.sources.object import ObjectSource
from ckptd.restore.sources.peer import PeerSource
from ckptd.tiers.base import Tier
from ckptd.tiers.disk import DiskTier

__all__ = ["DiskSource", "MemorySource", "ObjectSource", "PeerSource", "RestoreSource", "Source",
           "default_sources"]


def default_sources(catalog: Catalog, pool: SlotPool, executor: Executor, *, disk: DiskTier | None,
                    object_tier: Tier | None, peers: Callable[[], PeerDirectory | None]) -> list[RestoreSource]:
    """The restore sources of a daemon: memory always, disk and object when configured, peers
    through ``peers`` (the current peer directory, None while replication is off)."""
    sources: list[RestoreSource] = [MemorySource(catalog, pool, executor)]
    if disk is not None:
        sources.append(DiskSource(disk, catalog, executor))
    sources.append(PeerSource(peers, catalog))
    if object_tier is not None:
        sources.append(ObjectSource(object_tier, catalog, executor))
    return sources
