"""Disk tier: shards and manifests as files on local NVMe, made durable with fsync.

Layout: ``{root}/{job}/step-{step:012d}/rank-{rank:06d}.shard`` and ``.../manifest.json``.
Commit protocol (DESIGN.md section 3), each step's directory:
1. write each shard into ``.tmp-<uuid>/`` (O_DIRECT for the aligned body where supported, a
   buffered tail), fsync the file;
2. publish it with link(2), which fails if the target exists, fsync the step directory;
3. after every shard is published, write ``manifest.json`` the same way: that is the commit.
An fsync error means the file is lost: the caller rewrites it, never retries the fsync.
Directories are made durably (``FsOps.makedirs``: each new directory's parent is fsync'd, the
data root's included), so a power loss cannot drop a committed step with its parent directory.
Delete un-commits first (unlink the manifest, fsync the step directory), then removes the data.
Start-up recovery removes ``.tmp-*`` directories and step directories without a manifest.
Reads verify size and every chunk crc32c and name the file on a mismatch.
Every file-system mutation goes through the tier's ``FsOps`` (ckptd/core/fsops.py), the seam that
crash-point tests record and that ``fs.mutation`` failpoints count.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil  # noqa: F401 - the default FsOps.rmtree calls shutil.rmtree; tests patch it through here
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ckptd.core import failpoints
from ckptd.core.errors import AlreadyExists, IntegrityError, NotFound, TierFailed
from ckptd.core.fsops import DEFAULT as DEFAULT_FS
from ckptd.core.fsops import FsOps
from ckptd.core.integrity import first_bad_chunk
from ckptd.core.logs import ProgressLog
from ckptd.core.manifest import MANIFEST_NAME, Manifest, ShardEntry
from ckptd.core.types import TierName, parse_step_dirname, step_dirname, validate_job

MANIFEST_MEMO_ENTRIES = 8

log = logging.getLogger("ckptd.disk")

DIRECT_ALIGN_BYTES = 4096


def write_file_durable(
    path: Path, src: memoryview, direct_io: bool, block_bytes: int, fs: FsOps = DEFAULT_FS
) -> None:
    """Create ``path`` (must not exist) with src's bytes and fsync it."""
    n = src.nbytes
    progress = ProgressLog(log, f"writing {path.name}", n, tier="disk")
    body = n // DIRECT_ALIGN_BYTES * DIRECT_ALIGN_BYTES if direct_io else 0
    written = 0
    created = False  # the O_DIRECT open created the file (even if no write went through it)
    if body:
        try:
            fd = fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            body = 0  # the filesystem has no O_DIRECT
        else:
            created = True
            try:
                while written < body:
                    end = min(written + block_bytes, body)
                    step = fs.pwrite(fd, src[written:end], written)
                    written += step
                    progress.update(step)
            except OSError as exc:
                if exc.errno != errno.EINVAL or written:
                    raise
                body = 0  # unaligned buffer or device: fall back to buffered writes
            finally:
                fs.close(fd)
    flags = os.O_WRONLY | (0 if created else os.O_CREAT | os.O_EXCL)
    fd = fs.open(path, flags, 0o600)
    try:
        while written < n:
            end = min(written + block_bytes, n)
            written += fs.pwrite(fd, src[written:end], written)
        failpoints.hit("disk.file.before_fsync")
        fs.fsync(fd)
        failpoints.hit("disk.file.after_fsync")
    finally:
        fs.close(fd)


class DiskTier:
    """Blocking implementation of the Tier protocol on a local filesystem."""

    name = TierName.DISK

    def __init__(
        self, root: Path, direct_io: bool = True, block_bytes: int = 8 * 2**20, fs: FsOps = DEFAULT_FS
    ) -> None:
        self.root = root
        self.direct_io = direct_io
        self.block_bytes = block_bytes
        self.fs = fs
        self._dirs_lock = threading.Lock()  # one maker per directory: shards are put concurrently
        # parsed manifests by (path, dev, inode, size, mtime, ctime), oldest first out
        self._manifests: dict[tuple[str, int, int, int, int, int], Manifest] = {}

    # -- paths ------------------------------------------------------------------------------
    def step_dir(self, job: str, step: int) -> Path:
        return self.root / validate_job(job) / step_dirname(step)

    def _ensure_step_dir(self, job: str, step: int) -> Path:
        job_dir = self.root / validate_job(job)
        step_dir = job_dir / step_dirname(step)
        with self._dirs_lock:
            if not step_dir.exists():
                self.fs.makedirs(step_dir)
        return step_dir

    def _publish(self, tmp_file: Path, target: Path, committed_check: bool) -> None:
        try:
            self.fs.link(tmp_file, target)
        except FileExistsError:
            if committed_check and (target.parent / MANIFEST_NAME).exists():
                raise AlreadyExists(f"{target.parent} is already committed") from None
            if not committed_check:
                raise AlreadyExists(f"{target} already exists") from None
            self.fs.unlink(target)  # a leftover of an earlier attempt at an uncommitted step
            self.fs.link(tmp_file, target)

    def _write_published(self, job: str, step: int, name: str, src: memoryview, is_manifest: bool) -> None:
        step_dir = self._ensure_step_dir(job, step)
        tmp = step_dir / f".tmp-{uuid.uuid4().hex}"
        self.fs.mkdir(tmp)
        try:
            tmp_file = tmp / name
            prefix = "disk.manifest" if is_manifest else "disk.shard"
            failpoints.hit(f"{prefix}.before_write")
            write_file_durable(tmp_file, src, self.direct_io and not is_manifest, self.block_bytes, self.fs)
            failpoints.hit(f"{prefix}.before_link")
            self._publish(tmp_file, step_dir / name, committed_check=not is_manifest)
            failpoints.hit(f"{prefix}.after_link")
            self.fs.fsync_dir(step_dir)
            failpoints.hit(f"{prefix}.after_dir_fsync")
        finally:
            self.fs.rmtree(tmp)

    # -- Tier protocol ----------------------------------------------------------------------
    def put_shard(self, job: str, step: int, entry: ShardEntry, src: memoryview) -> None:
        if src.nbytes != entry.nbytes:
            raise ValueError(f"shard {entry.rank}: {src.nbytes} bytes given, {entry.nbytes} expected")
        try:
            self._write_published(job, step, entry.key, src, is_manifest=False)
        except (AlreadyExists, ValueError):
            raise
        except OSError as exc:
            raise TierFailed(f"disk tier: writing {job}@{step} rank {entry.rank} failed: {exc}") from exc

    def put_file(self, job: str, step: int, name: str, src: memoryview, direct_io: bool) -> None:
        """Publish one file in the step's directory with the shard protocol (temp file, fsync,
        link that fails if the name exists, directory fsync); for stores kept beside the tier's
        own steps (ckptd/peers/replica_disk.py). Raises AlreadyExists if ``name`` is already there."""
        self._write_published(job, step, name, src, is_manifest=not direct_io)

    def commit(self, manifest: Manifest) -> None:
        step_dir = self.step_dir(manifest.job, manifest.step)
        for s in manifest.shards:
            if not (step_dir / s.key).exists():
                raise TierFailed(f"disk tier: cannot commit {manifest.job}@{manifest.step}: {s.key} missing")
        data = memoryview(manifest.to_json())
        try:
            self._write_published(manifest.job, manifest.step, MANIFEST_NAME, data, is_manifest=True)
        except AlreadyExists:
            raise AlreadyExists(f"{manifest.job}@{manifest.step} is already committed on disk") from None
        except OSError as exc:
            raise TierFailed(f"disk tier: committing {manifest.job}@{manifest.step} failed: {exc}") from exc
        self._remember(step_dir / MANIFEST_NAME, manifest)  # a restore right after needs no parse

    def _remember(self, path: Path, manifest: Manifest) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        with self._dirs_lock:
            self._manifests[(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)] = manifest
            while len(self._manifests) > MANIFEST_MEMO_ENTRIES:
                del self._manifests[next(iter(self._manifests))]

    def list_jobs(self) -> list[str]:
        if not self.root.exists():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            try:
                if p.is_dir():
                    out.append(validate_job(p.name))
            except ValueError:
                continue
        return out

    def list_committed(self, job: str) -> list[int]:
        job_dir = self.root / validate_job(job)
        if not job_dir.is_dir():
            return []
        steps = []
        for p in job_dir.iterdir():
            step = parse_step_dirname(p.name)
            if step is not None and (p / MANIFEST_NAME).is_file():
                steps.append(step)
        return sorted(steps)

    def read_manifest(self, job: str, step: int) -> Manifest:
        """The committed manifest of job@step. A manifest is parsed once per file version: a
        restore plans with it and reads with it, and one of a large state holds ~10^5 tensors;
        the memo is keyed by the file's identity and times (a manifest is replaced by rename,
        never edited in place), so a changed or replaced file is always parsed anew."""
        path = self.step_dir(job, step) / MANIFEST_NAME
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                with self._dirs_lock:
                    cached = self._manifests.get(key)
                if cached is not None:
                    return cached
                data = f.read()
        except FileNotFoundError:
            raise NotFound(f"{job}@{step} is not committed on disk") from None
        try:
            manifest = Manifest.from_json(data)
        except ValueError as exc:
            raise IntegrityError(f"{path}: invalid manifest: {exc}") from None
        if manifest.job != job or manifest.step != step:
            raise IntegrityError(f"{path}: manifest names {manifest.job}@{manifest.step}")
        with self._dirs_lock:
            self._manifests[key] = manifest
            while len(self._manifests) > MANIFEST_MEMO_ENTRIES:
                del self._manifests[next(iter(self._manifests))]
        return manifest

    def shard_path(self, job: str, step: int, entry: ShardEntry) -> Path:
        return self.step_dir(job, step) / entry.key

    def read_shard_into(self, job: str, step: int, entry: ShardEntry, dst: memoryview) -> None:
        path = self.shard_path(job, step, entry)
        try:
            size = path.stat().st_size
            if size != entry.nbytes:
                raise IntegrityError(f"{path}: size {size} != {entry.nbytes} recorded in the manifest")
            view = dst[: entry.nbytes]
            with open(path, "rb", buffering=0) as f:
                got = 0
                while got < entry.nbytes:
                    n = f.readinto(view[got : got + self.block_bytes])
                    if not n:
                        raise IntegrityError(f"{path}: truncated at {got} of {entry.nbytes} bytes")
                    got += n
        except FileNotFoundError:
            raise NotFound(f"{path} is missing") from None
        except OSError as exc:
            raise TierFailed(f"disk tier: reading {path} failed: {exc}") from exc
        bad = first_bad_chunk(view, entry.chunk_bytes, entry.chunk_crc32c)
        if bad is not None:
            raise IntegrityError(f"{path}: crc32c mismatch in chunk {bad} (offset {bad * entry.chunk_bytes})")

    def delete(self, job: str, step: int) -> None:
        step_dir = self.step_dir(job, step)
        manifest = step_dir / MANIFEST_NAME
        if manifest.exists():
            self.fs.unlink(manifest)
            self.fs.fsync_dir(step_dir)
        if step_dir.exists():
            self.fs.rmtree(step_dir)
            self.fs.fsync_dir(step_dir.parent)

    # -- start-up ---------------------------------------------------------------------------
    def _remove_leftover(self, path: Path, removed: list[str]) -> None:
        """Remove an uncommitted leftover; record it only if it is gone (a read-only or failing
        disk keeps it: harmless, never listed, and retried by the next recovery)."""
        self.fs.rmtree(path)
        if path.exists():
            log.warning("recovery could not remove uncommitted %s (left for the next start)", path)
        else:
            removed.append(str(path))

    def recover(self) -> list[str]:
        """Remove temp dirs and uncommitted step dirs; return what was removed."""
        removed: list[str] = []
        self.fs.makedirs(self.root)
        for job in self.list_jobs():
            job_dir = self.root / job
            job_removed = len(removed)
            for p in sorted(job_dir.iterdir()):
                if p.name.startswith(".tmp-"):
                    self._remove_leftover(p, removed)
                    continue
                if parse_step_dirname(p.name) is None or not p.is_dir():
                    continue
                for q in sorted(p.iterdir()):
                    if q.name.startswith(".tmp-"):
                        self._remove_leftover(q, removed)
                if not (p / MANIFEST_NAME).exists():
                    self._remove_leftover(p, removed)
            if len(removed) > job_removed:
                self.fs.fsync_dir(job_dir)
        return removed


def read_verified_chunks(path: Path, entry: ShardEntry, dst: memoryview, chunks: Sequence[int]) -> None:
    """Read only ``chunks`` of ``path`` (a shard file) into ``dst`` at their offsets, each verified
    against its crc32c (a ranged restore; blocking). The other bytes of dst are left as they are."""
    n, chunk = entry.nbytes, entry.chunk_bytes
    with _open_shard(path, n) as f:
        for index in chunks:
            off, end = index * chunk, min(index * chunk + chunk, n)
            got = os.preadv(f.fileno(), [dst[off:end]], off)
            if got != end - off:
                raise IntegrityError(f"{path}: truncated in chunk {index}")
            if first_bad_chunk(dst[off:end], chunk, entry.chunk_crc32c[index : index + 1]) is not None:
                raise IntegrityError(f"{path}: crc32c mismatch in chunk {index} (offset {off})")


def read_verified(path: Path, entry: ShardEntry, dst: memoryview, block_bytes: int,
                  on_verified: Callable[[int], None] | None = None) -> None:
    """Read ``path`` (a shard file) into ``dst``, verifying size and each crc32c chunk as soon as
    it is complete; ``on_verified(n)`` after each chunk (blocking; run it in a worker thread)."""
    n, chunk = entry.nbytes, entry.chunk_bytes
    with _open_shard(path, n) as f:
        view = dst[:n]
        got = verified = 0
        while got < n:
            k = f.readinto(view[got : got + min(block_bytes, chunk - got % chunk)])
            if not k:
                raise IntegrityError(f"{path}: truncated at {got} of {n} bytes")
            got += k
            if got == n or got % chunk == 0:
                index = verified // chunk
                if first_bad_chunk(view[verified:got], chunk, entry.chunk_crc32c[index : index + 1]) is not None:
                    raise IntegrityError(f"{path}: crc32c mismatch in chunk {index} (offset {verified})")
                verified = got
                if on_verified is not None:
                    on_verified(verified)


@contextlib.contextmanager
def _open_shard(path: Path, nbytes: int) -> Iterator[io.FileIO]:
    """``path`` (a shard file) open for unbuffered reads at offset 0, its size checked against the
    manifest's; a missing file is NotFound, any other OS error (also while reading) TierFailed."""
    try:
        with open(path, "rb", buffering=0) as f:  # open: the fault tests wrap it
            size = f.seek(0, 2)
            if size != nbytes:
                raise IntegrityError(f"{path}: size {size} != {nbytes} recorded in the manifest")
            f.seek(0)
            yield f
    except FileNotFoundError:
        raise NotFound(f"{path} is missing") from None
    except OSError as exc:
        raise TierFailed(f"disk tier: reading {path} failed: {exc}") from exc
