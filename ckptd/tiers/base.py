"""The storage seams: ``Tier``, which every storage backend implements, and ``CommitTier``, the
commit side of a tier shared by several nodes.

A tier stores shards and commits steps with a manifest. Contract every implementation keeps
(checked on every tier by tests/tiers/test_tier_conformance.py):
- ``put_shard`` makes one rank's bytes durable at the tier (as durable as the tier can) but does
  not make the step visible;
- ``commit`` writes the manifest last and atomically; it fails if the step is already committed;
- ``list_committed`` derives the committed steps by listing manifests, nothing else;
- ``read_shard_into`` fills ``dst`` and verifies size and every chunk crc32c, raising
  IntegrityError naming the copy on a mismatch; it never returns unverified bytes;
- ``delete`` un-commits first (manifest gone) and then removes the data.

A ``CommitTier`` (the object store) is written by every node of a job, each for its own ranks;
one node, the step's coordinator, commits. On top of ``Tier`` it keeps:
- ``put_shard_meta`` records a node's entries (one record per node and step, named after its
  lowest rank) once its shards are stored, and ``list_shard_metas`` returns the recorded
  entries of a step by rank, so the coordinator builds the manifest from what every node
  recorded, nothing else; records named after a rank in ``skip`` (read before) are not read
  again (one read per record and step, however often the coordinator looks);
- ``is_committed`` answers for one step with one small request (a HEAD of its manifest), never a
  listing: every node of a job asks it while it waits for the coordinator's commit;
- a ``put_shard`` that failed part way may leave partial uploads behind: ``has_failed_uploads``
  says so and ``abort_failed_uploads`` removes them (called between uploads, never during one).

Drains and restores are typed against these protocols, never against one implementation.
Methods are blocking; the daemon calls them from its I/O thread pool, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import TierName


class Tier(Protocol):
    name: TierName

    def put_shard(self, job: str, step: int, entry: ShardEntry, src: memoryview) -> None:
        """Store src (exactly entry.nbytes bytes) as the shard of entry.rank."""
        ...

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest last, atomically; the step becomes visible."""
        ...

    def list_jobs(self) -> list[str]: ...

    def list_committed(self, job: str) -> list[int]:
        """Steps of job that have a manifest, ascending."""
        ...

    def read_manifest(self, job: str, step: int) -> Manifest: ...

    def read_shard_into(self, job: str, step: int, entry: ShardEntry, dst: memoryview) -> None:
        """Fill dst[:entry.nbytes] and verify it; IntegrityError on any mismatch."""
        ...

    def delete(self, job: str, step: int) -> None:
        """Un-commit (manifest first), then remove the step's data."""
        ...


class CommitTier(Tier, Protocol):
    """A tier written by several nodes whose steps one coordinator commits from per-rank records."""

    def put_shard_meta(self, job: str, step: int, entries: Sequence[ShardEntry], world_size: int) -> None:
        """Record this node's entries (ranks of a world_size step) after their shards were stored."""
        ...

    def list_shard_metas(self, job: str, step: int, world_size: int,
                         skip: Collection[int] = ()) -> dict[int, ShardEntry]:
        """The recorded entries of step, by rank (ranks not recorded yet, and ``skip``, are absent)."""
        ...

    def is_committed(self, job: str, step: int) -> bool:
        """Whether step's manifest is in the store (one request)."""
        ...

    @property
    def has_failed_uploads(self) -> bool:
        """Whether a failed put_shard may have left a partial upload behind."""
        ...

    def abort_failed_uploads(self) -> list[tuple[str, str]]:
        """Remove what failed put_shards left; (key, upload id) of each removed."""
        ...
