"""The uploader meets a step that is already committed in the object store (a node that restored
it from a peer uploads it again): ``put_shard`` raises AlreadyExists while the tier's frame still
holds a view of the shard file's mapping. The step must count as committed at the object tier,
not FAILED with a BufferError from closing the mapping."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ckptd.core.config import ObjectSection
from ckptd.core.errors import AlreadyExists
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import TierName
from ckptd.drains.upload import ObjectUploader
from ckptd.memory.catalog import Catalog, TierState
from ckptd.tiers.disk import DiskTier
from ckptd.tiers.object_io import byte_view
from tests._manifest_kit import shard


class _StoreHolding:
    """An object tier whose store already holds ``manifest`` committed; put_shard refuses the way
    the real tier does (its frame keeps a flat view of the source while it raises)."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.puts = 0

    def list_committed(self, job: str) -> list[int]:
        return []  # the uploader does not know yet: it finds out from put_shard

    def is_committed(self, job: str, step: int) -> bool:
        return False

    def read_manifest(self, job: str, step: int) -> Manifest:
        return self.manifest

    def put_shard(self, job: str, step: int, entry: ShardEntry, src: memoryview) -> None:
        self.puts += 1
        view = byte_view(src)
        raise AlreadyExists(f"{job}@{step} is already committed ({view.nbytes} bytes offered)")


def _run(tmp_path: Path, stored: Manifest | None = None) -> tuple[TierState, str]:
    entry = shard(0, 20_000)
    manifest = Manifest("job", 7, 1, (entry,), created_unix_s=1.0)
    disk = DiskTier(tmp_path / "data", False, 2**20)
    data = bytes((0 * 7 + i) % 251 for i in range(entry.nbytes))
    disk.put_shard("job", 7, entry, memoryview(data))
    disk.commit(manifest)
    catalog = Catalog()
    st = catalog.ensure("job", 7, 1)
    st.tiers[TierName.DISK] = (TierState.COMMITTED, "")
    tier: Any = _StoreHolding(stored or manifest)
    with ThreadPoolExecutor(2) as ex:
        up = ObjectUploader(catalog, SimpleNamespace(), disk, {},  # type: ignore[arg-type]
                            tier, ObjectSection(enabled=True, bucket="b"), ex)
        asyncio.run(up._upload(st))
    assert tier.puts == 1
    return st.tiers[TierName.OBJECT]


def test_already_exists_from_the_store_counts_as_committed(tmp_path: Path) -> None:
    state, msg = _run(tmp_path)
    assert state == TierState.COMMITTED, msg
    assert "already in the store" in msg


def test_already_exists_with_other_content_is_committed_and_says_so(tmp_path: Path) -> None:
    other = Manifest("job", 7, 1, (shard(0, 20_001),), created_unix_s=1.0)
    state, msg = _run(tmp_path, other)
    assert state == TierState.COMMITTED, msg
    assert "differ" in msg
