"""The disk tier's own behaviour, beyond the Tier contract (test_tier_conformance.py): its layout
on the filesystem (0600 files, one directory per step), delete removing the manifest before the
data, and start-up recovery removing temporary and uncommitted directories, idempotently."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.tiers.disk import DiskTier
from tests.tiers._tier_kit import CHUNK, JOB, read, save_step


@pytest.fixture
def disk(tmp_path: Path) -> DiskTier:
    return DiskTier(tmp_path / "disk", direct_io=True, block_bytes=8192)


def test_disk_layout_on_the_filesystem(disk: DiskTier) -> None:
    m, blobs = save_step(disk, JOB, 12, [100, 0])
    step_dir = disk.root / JOB / "step-000000000012"
    assert sorted(p.name for p in step_dir.iterdir()) == ["manifest.json", "rank-000000.shard", "rank-000001.shard"]
    assert (step_dir / "rank-000000.shard").read_bytes() == blobs[0]
    assert (step_dir / "rank-000001.shard").stat().st_size == 0
    assert (step_dir / "manifest.json").read_bytes() == m.to_json()
    for p in step_dir.iterdir():
        assert p.stat().st_mode & 0o077 == 0  # files 0600


def test_disk_delete_uncommits_before_removing_data(disk: DiskTier, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while the data is being removed leaves no committed step behind."""
    save_step(disk, JOB, 1, [100])
    m2, _ = save_step(disk, JOB, 2, [100])
    import ckptd.tiers.disk as disk_mod

    def crash(path: object, ignore_errors: bool = False) -> None:
        raise RuntimeError("crash while removing data")

    monkeypatch.setattr(disk_mod.shutil, "rmtree", crash)
    with pytest.raises(RuntimeError):
        disk.delete(JOB, 2)
    monkeypatch.undo()
    assert disk.list_committed(JOB) == [1]  # the manifest went first
    assert disk.shard_path(JOB, 2, m2.shards[0]).exists()  # data still there: removed second
    assert str(disk.step_dir(JOB, 2)) in disk.recover()  # and start-up recovery cleans it
    assert not disk.step_dir(JOB, 2).exists()


def test_disk_recover_removes_temp_and_uncommitted(disk: DiskTier) -> None:
    m1, b1 = save_step(disk, JOB, 1, [100, 300])
    save_step(disk, JOB, 2, [100, 300], commit=False)  # shards but no manifest
    job_dir = disk.root / JOB
    tmp_in_job = job_dir / ".tmp-deadbeef"
    tmp_in_job.mkdir()
    (tmp_in_job / "rank-000000.shard").write_bytes(b"x")
    tmp_in_step = disk.step_dir(JOB, 1) / ".tmp-cafe"
    tmp_in_step.mkdir()
    (tmp_in_step / "manifest.json").write_bytes(b"{}")
    empty_step = job_dir / "step-000000000003"
    empty_step.mkdir()
    stranger = job_dir / "notes"  # not a step directory: left alone
    stranger.mkdir()
    removed = set(disk.recover())
    assert removed == {str(tmp_in_job), str(tmp_in_step), str(disk.step_dir(JOB, 2)), str(empty_step)}
    assert sorted(p.name for p in job_dir.iterdir()) == ["notes", "step-000000000001"]
    assert sorted(p.name for p in disk.step_dir(JOB, 1).iterdir()) == [
        "manifest.json", "rank-000000.shard", "rank-000001.shard"]
    assert disk.list_committed(JOB) == [1]
    assert read(disk, JOB, 1, m1.shards[1]) == b1[1]
    assert disk.recover() == []  # idempotent


def test_disk_recover_on_a_fresh_root(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "does" / "not" / "exist")
    assert disk.recover() == []
    assert disk.root.is_dir()
    assert disk.list_jobs() == []


def test_disk_list_jobs_ignores_strangers(disk: DiskTier) -> None:
    save_step(disk, JOB, 1, [10])
    (disk.root / "bad..name").mkdir()
    (disk.root / ".hidden").mkdir()
    (disk.root / "a-file").write_bytes(b"")
    assert disk.list_jobs() == [JOB]


def test_disk_leaves_no_temp_files(disk: DiskTier) -> None:
    save_step(disk, JOB, 1, [5 * CHUNK + 1, 10])
    leftovers = [p for p in disk.root.rglob(".tmp-*")]
    assert leftovers == []


def test_a_manifest_is_parsed_once_per_file_version(disk: DiskTier) -> None:
    """The committed manifest is served from the memo (the commit seeded it); a manifest replaced
    on disk (another file, by rename) or damaged in place is read anew, never served stale."""
    import os

    from ckptd.core.errors import IntegrityError
    from ckptd.core.manifest import Manifest

    m, _ = save_step(disk, JOB, 3, [100])
    first = disk.read_manifest(JOB, 3)
    assert first == m and disk.read_manifest(JOB, 3) is first
    path = disk.root / JOB / "step-000000000003" / "manifest.json"
    tmp = path.with_name("manifest.json.new")
    tmp.write_bytes(path.read_bytes())
    os.replace(tmp, path)  # the same bytes in another file: parsed again
    again = disk.read_manifest(JOB, 3)
    assert again == m and again is not first and Manifest.from_json(path.read_bytes()) == again
    with open(path, "r+b") as f:  # damaged in place: the new times make it a miss
        f.seek(0)
        f.write(b"#")
    with pytest.raises(IntegrityError, match="invalid manifest"):
        disk.read_manifest(JOB, 3)
