"""The Tier protocol: the one seam every storage backend implements.

A tier stores shards and commits steps with a manifest. Contract every implementation keeps
(checked on every tier by tests/tiers/test_tier_conformance.py):
- ``put_shard`` makes one rank's bytes durable at the tier (as durable as the tier can) but does
  not make the step visible;
- ``commit`` writes the manifest last and atomically; it fails if the step is already committed;
- ``list_committed`` derives the committed steps by listing manifests, nothing else;
- ``read_shard_into`` fills ``dst`` and verifies size and every chunk crc32c, raising
  IntegrityError naming the copy on a mismatch; it never returns unverified bytes;
- ``delete`` un-commits first (manifest gone) and then removes the data.
Methods are blocking; the daemon calls them from its I/O thread pool, never on the event loop.
"""

from __future__ import annotations

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
