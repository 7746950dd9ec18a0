"""Object tier: shards and manifests in an S3-compatible bucket (AWS S3, MinIO, Alibaba OSS).

Job: make a step durable beyond the cluster, under the bucket layout of ``object_layout``.

``ObjectTier`` implements the Tier and CommitTier protocols (tiers/base.py) on ``object_base``
(client, listings, manifests, records, probes) and helpers: ``object_layout`` (which key holds
what), ``object_client`` (the boto3 client, presets, per-key deadlines, error classification),
``object_chunks`` and ``object_codec`` (chunk uploads and reads, codecs), ``object_io`` (ranged
GETs of whole-shard objects), ``object_commit`` (create-only manifest put, claim fallback,
per-rank records) and ``object_gc`` (mark-and-sweep).

Invariants:
- Data first, manifest last. ``put_shard`` stores a shard as one object per chunk
  (``object_chunks``: compressed per chunk, deduplicated against the job's newest committed
  step and the chunks uploaded before, ``max_concurrency`` requests in flight, at most
  ``max_upload_mbit``) and never makes a step visible; it refuses (AlreadyExists) to write into
  a committed step. The chunk records join the entry in ``put_shard_meta`` and ``commit``.
  ``commit`` checks every object the manifest names exists with the recorded size, then writes
  ``manifest.json`` create-only (``object_commit``).
- Steps stored before chunking (one object per shard, no chunk records) still read and delete.
- No delete removes an object a committed manifest of the job references (``object_gc``:
  mark-and-sweep from committed manifests); ``sweep`` collects a whole job (``ckptctl gc``).
- A step without a manifest does not exist: ``list_committed`` lists
  ``{job}/step-*/manifest.json`` and nothing else.
- Integrity is ckptd's own: ``read_shard_into`` checks each object's size and every chunk's
  crc32c after decoding (IntegrityError naming ``s3://bucket/key``) and never writes into
  ``dst`` after it returns.
- Every blocking call is bounded: botocore retries and timeouts, and ``total_timeout_s`` per
  put_shard / commit / read_shard_into (``object_client.Deadlines``). Failures are typed:
  TierFailed (store unreachable, throttled past the budget, refused), NotFound, AlreadyExists,
  IntegrityError.
- Multipart uploads (of versions before chunking) are aborted by ``cleanup_incomplete`` at start-up.

Methods are blocking; the daemon calls them from its I/O thread pool, never on the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ckptd.core import failpoints
from ckptd.core.config import ObjectSection
from ckptd.core.errors import AlreadyExists, IntegrityError, NotFound, TierFailed
from ckptd.core.layout import chunk_count
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import TierName, shard_key
from ckptd.tiers.object_base import ObjectBase
from ckptd.tiers.object_chunks import (
    ChunkBook,
    ChunkUploader,
    Known,
    RateLimiter,
    UploadStats,
    fetch_chunks_into,
    upload_chunks,
)
from ckptd.tiers.object_client import (
    MAX_BACKOFF_S,
    PRESETS,
    SDK_LOGGERS,
    STORE_ERRORS,
    Preset,
    oss_endpoint,
    pin_sdk_loggers,
)
from ckptd.tiers.object_codec import CodecChooser
from ckptd.tiers.object_commit import (
    COMMIT_TOKEN_META,
    commit_conditional,
    commit_with_claim,
    shard_record,
)
from ckptd.tiers.object_gc import job_candidates, sweep
from ckptd.tiers.object_io import (
    READ_BLOCK_BYTES,
    byte_view,
    map_all,
    read_whole_into,
)
from ckptd.tiers.object_layout import CLAIM_NAME, HASHED_DIR, PROBE_DIR, SHARD_META_SUFFIX

__all__ = [  # the names this module has always offered
    "CLAIM_NAME", "COMMIT_TOKEN_META", "HASHED_DIR", "MAX_BACKOFF_S", "PRESETS", "PROBE_DIR", "READ_BLOCK_BYTES",
    "SDK_LOGGERS", "SHARD_META_SUFFIX", "ObjectTier", "Preset", "oss_endpoint", "pin_sdk_loggers",
]

log = logging.getLogger("ckptd.object")


class ObjectTier(ObjectBase):
    """Blocking implementation of the Tier protocol on an S3-compatible bucket.

    ``ObjectTier(section)`` builds a boto3 client from an ``[object]`` config section;
    ``client_config`` (a botocore Config) is merged over it, e.g. for an HTTP proxy.
    """

    name = TierName.OBJECT

    def __init__(self, section: ObjectSection, *, client_config: Any = None) -> None:
        super().__init__(section, client_config=client_config)
        self.stats = UploadStats()
        self._uploader = ChunkUploader(
            self._store, self._pool, CodecChooser(section.compression_level, section.compression),
            RateLimiter(section.max_upload_mbit * 1e6 / 8), self.stats, 2 * section.max_concurrency)
        self._book = ChunkBook()

    # -- Tier protocol ----------------------------------------------------------------------
    def put_shard(self, job: str, step: int, entry: ShardEntry, src: memoryview) -> None:
        view = byte_view(src)
        if view.nbytes != entry.nbytes:
            raise ValueError(f"shard {entry.rank}: {view.nbytes} bytes given, {entry.nbytes} expected")
        mkey = self.manifest_key(job, step)
        keys = [self.chunk_object_key(job, step, entry.rank, i) for i in range(chunk_count(entry.nbytes,
                                                                                            entry.chunk_bytes))]
        deadline = time.monotonic() + self.total_timeout_s
        started = time.monotonic()
        with self._deadlines.scope([mkey, *keys], deadline):
            try:
                # Never overwrite a shard of a committed step (its manifest's checksums would lie).
                if self._head(mkey) is not None:
                    raise AlreadyExists(f"{job}@{step} is already committed in {self.url(mkey)}")
                known = self._known_chunks(job, step)
                refs = upload_chunks(self._uploader, entry, view, keys.__getitem__, known)
            except STORE_ERRORS as exc:
                self._book.forget(job)  # what this upload stored is garbage now: never reference it
                raise self._failed(f"uploading {job}@{step} rank {entry.rank} to {self.url(keys[0] if keys else mkey)}",
                                   exc) from exc
        self._book.stage(job, step, entry.rank, entry.nbytes, refs)
        stored = sum(r.stored_bytes for r in refs if r.object_key in keys)
        log.debug("uploaded %s (%d bytes as %d stored, %d chunks) in %.3fs",
                  self.url(self.step_prefix(job, step) + shard_key(entry.rank)), entry.nbytes, stored, len(refs),
                  time.monotonic() - started, extra={"job": job, "step": step, "rank": entry.rank, "tier": "object"})

    def _known_chunks(self, job: str, step: int) -> Known:
        """The chunks put_shard may reference instead of uploading (``ChunkBook.known``)."""
        if not self.section.dedup:
            return {}
        newest = max((s for s in self.list_committed(job) if s < step), default=None)
        return self._book.known(job, step, newest, lambda s: self.read_manifest(job, s))

    def _as_stored(self, job: str, step: int, entry: ShardEntry) -> ShardEntry:
        """entry with the chunk records of this tier's upload of it (entry itself when it has
        records already or was not uploaded by this tier)."""
        staged = None if entry.chunks else self._book.staged(job, step, entry.rank)
        if staged is None:
            return entry
        nbytes, refs = staged
        if nbytes != entry.nbytes:
            raise IntegrityError(f"{self.url(self.chunk_object_key(job, step, entry.rank, 0))}...: size {nbytes} != "
                                 f"{entry.nbytes} in the manifest")
        return dataclasses.replace(entry, chunks=refs)

    def commit(self, manifest: Manifest) -> None:
        job, step = manifest.job, manifest.step
        shards = tuple(self._as_stored(job, step, s) for s in manifest.shards)
        shards = tuple(s if s.chunks or not s.nbytes
                       else dataclasses.replace(s, object_key=self._entry_key(job, step, s)) for s in shards)
        recorded = dataclasses.replace(manifest, shards=shards)
        mkey, ckey = self.manifest_key(job, step), self.claim_key(job, step)
        sizes = self._object_sizes(job, recorded)
        keys = sorted(sizes)
        deadline = time.monotonic() + self.total_timeout_s
        with self._deadlines.scope([mkey, ckey, *keys], deadline):
            try:
                heads = map_all(self._pool, self._head, keys)
            except STORE_ERRORS as exc:
                raise self._failed(f"checking the shards of {job}@{step}", exc) from exc
            for key, head in zip(keys, heads):
                if head is None:
                    raise TierFailed(f"object tier: cannot commit {job}@{step}: {self.url(key)} missing")
                if int(head["ContentLength"]) != sizes[key]:
                    raise IntegrityError(
                        f"{self.url(key)}: size {head['ContentLength']} != {sizes[key]} in the manifest"
                    )
            body = recorded.to_json()
            token = uuid.uuid4().hex
            failpoints.hit("object.commit.checked")
            try:
                if self.conditional_put_supported():
                    commit_conditional(self._store, mkey, body, token, deadline)
                else:
                    commit_with_claim(self._store, mkey, ckey, body, token, self.stale_upload_age_s)
            except STORE_ERRORS as exc:
                raise self._failed(f"committing {job}@{step} to {self.url(mkey)}", exc) from exc
        failpoints.hit("object.commit.after_manifest")

    def _object_sizes(self, job: str, manifest: Manifest) -> dict[str, int]:
        """Every object key manifest references (checked against the layout) -> its size."""
        out: dict[str, int] = {}
        for s in manifest.shards:
            if s.chunks:
                for ref in s.chunks:
                    out[self.check_chunk_key(job, ref.object_key)] = ref.stored_bytes
            elif s.nbytes:  # an empty shard has no chunk, hence no object
                out[self._entry_key(job, manifest.step, s)] = s.nbytes
        return out

    def put_shard_meta(self, job: str, step: int, entry: ShardEntry, world_size: int) -> None:
        """Record that rank's shard is uploaded, with its layout and checksums. The step's
        coordinator builds the manifest from these records once all ``world_size`` are there."""
        key = self.shard_meta_key(job, step, entry.rank)
        entry = self._as_stored(job, step, entry)
        for ref in entry.chunks:
            self.check_chunk_key(job, ref.object_key)
        body = shard_record(entry, world_size)
        deadline = time.monotonic() + self.total_timeout_s
        with self._deadlines.scope([key], deadline):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json")
            except STORE_ERRORS as exc:
                raise self._failed(f"recording {job}@{step} rank {entry.rank} at {self.url(key)}", exc) from exc

    def read_chunks_into(self, job: str, step: int, entry: ShardEntry, dst: memoryview,
                         chunks: Sequence[int]) -> None:
        """A ranged restore's read: only ``chunks`` (crc32c chunk indexes) fetched and verified."""
        self.read_shard_into(job, step, entry, dst, tuple(chunks))

    def read_shard_into(self, job: str, step: int, entry: ShardEntry, dst: memoryview,
                        chunks: Sequence[int] = ()) -> None:
        n = entry.nbytes
        view = byte_view(dst)
        if view.readonly or view.nbytes < n:
            raise ValueError(f"read_shard_into: dst must be writable and hold {n} bytes")
        view = view[:n]
        if n == 0:
            return
        if not entry.chunks:  # an entry from another copy (disk, a peer): the store's says where
            entry = self._stored_entry(job, step, entry)
        if entry.chunks:
            keys = [self.check_chunk_key(job, ref.object_key) for ref in entry.chunks]
            deadline = time.monotonic() + self.total_timeout_s
            with self._deadlines.scope(keys, deadline):
                try:
                    fetch_chunks_into(self._store, self._pool, entry, view, deadline, chunks)
                except (IntegrityError, NotFound):
                    raise
                except STORE_ERRORS as exc:
                    raise self._failed(f"reading {job}@{step} rank {entry.rank}", exc) from exc
            return
        self._read_whole_into(job, step, entry, view, chunks)

    def _stored_entry(self, job: str, step: int, entry: ShardEntry) -> ShardEntry:
        """entry with the chunk records of the store manifest's entry of its rank, when that has
        the same size and chunking (the caller's checksums are the ones verified); else entry
        (then read as a whole-shard object)."""
        try:
            stored = self.read_manifest(job, step).shard(entry.rank)
        except (NotFound, KeyError):
            return entry
        if (stored.nbytes, stored.chunk_bytes) != (entry.nbytes, entry.chunk_bytes):
            return entry
        return dataclasses.replace(entry, chunks=stored.chunks)

    def _read_whole_into(self, job: str, step: int, entry: ShardEntry, view: memoryview,
                         chunks: Sequence[int]) -> None:
        """A shard stored as one object (steps from before chunking): verified ranged GETs."""
        key = self._entry_key(job, step, entry)
        deadline = time.monotonic() + self.total_timeout_s
        with self._deadlines.scope([key], deadline):
            try:
                read_whole_into(self._store, self._pool, key, view, entry, self.range_bytes(entry.chunk_bytes),
                                deadline, self.section.max_attempts, chunks)
            except (IntegrityError, NotFound):
                raise
            except STORE_ERRORS as exc:
                raise self._failed(f"reading {self.url(key)}", exc) from exc

    def delete(self, job: str, step: int) -> None:
        mkey = self.manifest_key(job, step)
        manifest: Manifest | None = None
        with contextlib.suppress(NotFound, IntegrityError):
            manifest = self.read_manifest(job, step)
        # What the step's manifest references, checked against the layout before anything goes.
        candidates = set(self._object_sizes(job, manifest)) if manifest is not None else set()
        try:
            # Un-commit first: once the manifest is gone the step is not listed, whatever
            # happens to the data below.
            self.client.delete_object(Bucket=self.bucket, Key=mkey)
            self.client.delete_object(Bucket=self.bucket, Key=self.claim_key(job, step))
            failpoints.hit("object.gc.after_uncommit")
            for found in map_all(self._pool, self._store.list_keys, self.step_shard_prefixes(job, step)):
                candidates.update(found)
            sweep(self._store, self._pool, candidates, lambda: self.referenced(job))
        except STORE_ERRORS as exc:
            raise self._failed(f"deleting {job}@{step}", exc) from exc
        self._book.forget(job)

    def referenced(self, job: str) -> set[str]:
        """Every object key the job's committed manifests reference (the mark of mark-and-sweep)."""
        keys: set[str] = set()
        for step in self.list_committed(job):
            with contextlib.suppress(NotFound):
                keys.update(self._object_sizes(job, self.read_manifest(job, step)))
        return keys

    def sweep(self, job: str, older_than_s: float) -> list[str]:
        """Garbage-collect job (``object_gc``): delete every object of a step without a manifest
        that no committed manifest references and is older than older_than_s; the keys deleted."""
        try:
            found = job_candidates(self._store, self.job_data_prefixes(job), self.base,
                                   set(self.list_committed(job)), self.step_of_key, older_than_s)
            return sweep(self._store, self._pool, found, lambda: self.referenced(job))
        except STORE_ERRORS as exc:
            raise self._failed(f"sweeping {job}", exc) from exc
