"""Object tier: shards and manifests in an S3-compatible bucket (AWS S3, MinIO, Alibaba OSS).

Job: make a step durable beyond the cluster, under the bucket layout of ``object_layout``.

``ObjectTier`` implements the Tier and CommitTier protocols (tiers/base.py) on four helpers:
``object_layout`` (which key holds what), ``object_client`` (the boto3 client, presets, per-key
deadlines, error classification), ``object_io`` (uploads from a buffer, parallel verified ranged
GETs) and ``object_commit`` (create-only manifest put, claim fallback, per-rank records).

Invariants:
- Data first, manifest last. ``put_shard`` uploads with boto3's transfer manager (multipart,
  ``max_concurrency`` parts in flight) and never makes a step visible; it refuses
  (AlreadyExists) to write into a committed step. ``commit`` checks every shard object exists
  with the recorded size, then writes ``manifest.json`` create-only (``object_commit``).
- A step without a manifest does not exist: ``list_committed`` lists
  ``{job}/step-*/manifest.json`` and nothing else.
- Integrity is ckptd's own: ``read_shard_into`` checks the object size and every chunk crc32c
  recorded in the manifest (IntegrityError naming ``s3://bucket/key``) and never writes into
  ``dst`` after it returns.
- Every blocking call is bounded: botocore retries and timeouts, and ``total_timeout_s`` per
  put_shard / commit / read_shard_into (``object_client.Deadlines``). Failures are typed:
  TierFailed (store unreachable, throttled past the budget, refused), NotFound, AlreadyExists,
  IntegrityError.
- Uploads the store could not be told to abort are aborted by ``cleanup_incomplete``, run at
  start-up; no upload of a live tier runs longer than ``stale_upload_age_s``.

Methods are blocking; the daemon calls them from its I/O thread pool, never on the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptd.core.config import ObjectSection, validate_object
from ckptd.core.errors import AlreadyExists, IntegrityError, InvalidArgument, NotFound, TierFailed
from ckptd.core.layout import chunk_count
from ckptd.core.logs import ProgressLog
from ckptd.core.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ShardEntry
from ckptd.core.types import TierName, parse_step_dirname, validate_job
from ckptd.tiers.object_client import (
    MAX_BACKOFF_S,
    PRESETS,
    SDK_LOGGERS,
    STORE_ERRORS,
    Bucket,
    DeadlineExceeded,
    Deadlines,
    Preset,
    endpoint_url,
    make_client,
    make_transfer_manager,
    oss_endpoint,
    pin_sdk_loggers,
)
from ckptd.tiers.object_commit import (
    COMMIT_TOKEN_META,
    commit_conditional,
    commit_with_claim,
    parse_shard_record,
    probe_create_only,
    shard_record,
)
from ckptd.tiers.object_io import (
    READ_BLOCK_BYTES,
    MemoryReader,
    abort_stale_uploads,
    byte_view,
    map_all,
    range_bytes,
    read_ranges_into,
)
from ckptd.tiers.object_layout import CLAIM_NAME, HASHED_DIR, PROBE_DIR, SHARD_META_SUFFIX, ObjectLayout

__all__ = [  # the names this module has always offered
    "CLAIM_NAME", "COMMIT_TOKEN_META", "HASHED_DIR", "MAX_BACKOFF_S", "PRESETS", "PROBE_DIR", "READ_BLOCK_BYTES",
    "SDK_LOGGERS", "SHARD_META_SUFFIX", "ObjectTier", "Preset", "oss_endpoint", "pin_sdk_loggers",
]

log = logging.getLogger("ckptd.object")


class ObjectTier(ObjectLayout):
    """Blocking implementation of the Tier protocol on an S3-compatible bucket.

    ``ObjectTier(section)`` builds a boto3 client from an ``[object]`` config section;
    ``client_config`` (a botocore Config) is merged over it, e.g. for an HTTP proxy.
    """

    name = TierName.OBJECT

    def __init__(self, section: ObjectSection, *, client_config: Any = None) -> None:
        if not section.bucket:
            raise ValueError("object tier: object.bucket is required")
        validate_object(section)
        pin_sdk_loggers()
        super().__init__(section.bucket, section.prefix, section.hashed_prefixes)
        self.section = section
        self.preset = PRESETS[section.preset]
        self.part_size_bytes = section.part_size_bytes
        self.total_timeout_s = section.total_timeout_s
        self.endpoint_url = endpoint_url(section)
        self.client = make_client(section, self.preset, self.endpoint_url, client_config)
        self._store = Bucket(self.client, self.bucket)
        self._transfer = make_transfer_manager(self.client, section)
        self._pool = ThreadPoolExecutor(section.max_concurrency, thread_name_prefix="ckptd-object")
        self._failed_uploads: set[str] = set()  # keys whose upload failed: a multipart part may be left
        self._deadlines = Deadlines()
        self._conditional: bool | None = {"on": True, "off": False}.get(section.conditional_put)
        self._probe_lock = threading.Lock()
        self._deadlines.register(self.client, forbid_overwrite_header=self.preset.forbid_overwrite_header)

    def close(self) -> None:
        """Release the transfer manager's and the reader's threads."""
        self._transfer.shutdown()
        self._pool.shutdown(wait=True)

    # -- requests ---------------------------------------------------------------------------
    def url(self, key: str) -> str:
        return self._store.url(key)

    def _failed(self, what: str, exc: BaseException) -> TierFailed:
        if isinstance(exc, DeadlineExceeded):
            return TierFailed(f"object tier: {what}: did not finish within {self.total_timeout_s:g}s ({exc})")
        return TierFailed(f"object tier: {what}: {type(exc).__name__}: {exc}")

    def _head(self, key: str) -> dict[str, Any] | None:
        """HEAD key; None when it does not exist (store errors raw)."""
        return self._store.head(key)

    # -- Tier protocol ----------------------------------------------------------------------
    def put_shard(self, job: str, step: int, entry: ShardEntry, src: memoryview) -> None:
        view = byte_view(src)
        if view.nbytes != entry.nbytes:
            raise ValueError(f"shard {entry.rank}: {view.nbytes} bytes given, {entry.nbytes} expected")
        key = self.shard_object_key(job, step, entry.rank)
        mkey = self.manifest_key(job, step)
        deadline = time.monotonic() + self.total_timeout_s
        started = time.monotonic()
        with self._deadlines.scope([key, mkey], deadline):
            try:
                # Never overwrite a shard of a committed step (its manifest's checksums would lie).
                if self._head(mkey) is not None:
                    raise AlreadyExists(f"{job}@{step} is already committed in {self.url(mkey)}")
                progress = ProgressLog(log, f"uploading {self.url(key)}", view.nbytes, job=job, step=step,
                                       rank=entry.rank, tier="object")
                future = self._transfer.upload(
                    MemoryReader(view, progress), self.bucket, key,
                    extra_args={"ContentType": "application/octet-stream"},
                )
                future.result()
            except STORE_ERRORS as exc:
                self._failed_uploads.add(key)
                raise self._failed(f"uploading {job}@{step} rank {entry.rank} to {self.url(key)}", exc) from exc
        self._failed_uploads.discard(key)
        log.debug("uploaded %s (%d bytes) in %.3fs", self.url(key), entry.nbytes, time.monotonic() - started,
                  extra={"job": job, "step": step, "rank": entry.rank, "tier": "object"})

    def commit(self, manifest: Manifest) -> None:
        job, step = manifest.job, manifest.step
        shards = tuple(
            dataclasses.replace(s, object_key=self._entry_key(job, step, s)) for s in manifest.shards
        )
        recorded = dataclasses.replace(manifest, shards=shards)
        mkey, ckey = self.manifest_key(job, step), self.claim_key(job, step)
        keys = [s.object_key for s in shards]
        deadline = time.monotonic() + self.total_timeout_s
        with self._deadlines.scope([mkey, ckey, *keys], deadline):
            try:
                heads = map_all(self._pool, self._head, keys)
            except STORE_ERRORS as exc:
                raise self._failed(f"checking the shards of {job}@{step}", exc) from exc
            for s, head in zip(shards, heads):
                if head is None:
                    raise TierFailed(f"object tier: cannot commit {job}@{step}: {self.url(s.object_key)} missing")
                if int(head["ContentLength"]) != s.nbytes:
                    raise IntegrityError(
                        f"{self.url(s.object_key)}: size {head['ContentLength']} != {s.nbytes} in the manifest"
                    )
            body = recorded.to_json()
            token = uuid.uuid4().hex
            try:
                if self.conditional_put_supported():
                    commit_conditional(self._store, mkey, body, token, deadline)
                else:
                    commit_with_claim(self._store, mkey, ckey, body, token, self.stale_upload_age_s)
            except STORE_ERRORS as exc:
                raise self._failed(f"committing {job}@{step} to {self.url(mkey)}", exc) from exc

    def list_jobs(self) -> list[str]:
        jobs: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.base, Delimiter="/"
            ):
                for cp in page.get("CommonPrefixes", ()):
                    name = str(cp["Prefix"])[len(self.base) :].rstrip("/")
                    try:
                        jobs.append(validate_job(name))
                    except ValueError:
                        continue  # _shards, _ckptd, foreign prefixes
        except STORE_ERRORS as exc:
            raise self._failed("listing jobs", exc) from exc
        return sorted(jobs)

    def list_committed(self, job: str) -> list[int]:
        job_prefix = self.job_prefix(job)
        steps: set[int] = set()
        try:
            for key in self._store.list_keys(job_prefix):
                step_name, sep, name = key[len(job_prefix) :].partition("/")
                if sep and name == MANIFEST_NAME:
                    step = parse_step_dirname(step_name)
                    if step is not None:
                        steps.add(step)
        except STORE_ERRORS as exc:
            raise self._failed(f"listing the steps of {job}", exc) from exc
        return sorted(steps)

    def read_manifest(self, job: str, step: int) -> Manifest:
        key = self.manifest_key(job, step)
        try:
            data = self._store.get_small(key, MAX_MANIFEST_BYTES)
        except STORE_ERRORS as exc:
            raise self._failed(f"reading {self.url(key)}", exc) from exc
        if data is None:
            raise NotFound(f"{job}@{step} is not committed in s3://{self.bucket}/{self.base}")
        try:
            manifest = Manifest.from_json(data)
        except ValueError as exc:
            raise IntegrityError(f"{self.url(key)}: invalid manifest: {exc}") from None
        if manifest.job != job or manifest.step != step:
            raise IntegrityError(f"{self.url(key)}: manifest names {manifest.job}@{manifest.step}")
        for s in manifest.shards:
            self._entry_key(job, step, s)
        return manifest

    def put_shard_meta(self, job: str, step: int, entries: Sequence[ShardEntry], world_size: int) -> None:
        """Record that this node's shards of the step are uploaded, with their layouts and
        checksums: one object per node, named after its lowest rank. The step's coordinator
        builds the manifest from these records once they cover all ``world_size`` ranks."""
        if not entries:
            raise InvalidArgument("a shard record needs at least one shard")
        first = min(e.rank for e in entries)
        key = self.shard_meta_key(job, step, first)
        body = shard_record(sorted(entries, key=lambda e: e.rank), world_size)
        deadline = time.monotonic() + self.total_timeout_s
        with self._deadlines.scope([key], deadline):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json")
            except STORE_ERRORS as exc:
                raise self._failed(f"recording {job}@{step} ranks from {first} at {self.url(key)}", exc) from exc

    def list_shard_metas(self, job: str, step: int, world_size: int,
                         skip: Collection[int] = ()) -> dict[int, ShardEntry]:
        """The entries of the records uploaded so far (rank -> entry), but those of records named
        after a rank in ``skip`` (read before: not read again); invalid ones raise."""
        prefix = self.step_prefix(job, step)
        known = {self.shard_meta_key(job, step, r) for r in skip}
        try:
            keys = [k for k in self._store.list_keys(prefix) if k.endswith(SHARD_META_SUFFIX) and k not in known]
            bodies = map_all(self._pool, lambda k: self._store.get_small(k, MAX_MANIFEST_BYTES), keys)
        except STORE_ERRORS as exc:
            raise self._failed(f"listing the shard records of {job}@{step}", exc) from exc
        out: dict[int, ShardEntry] = {}
        for key, body in zip(keys, bodies):
            if body is None:
                continue
            entries = parse_shard_record(self.url(key), body, world_size)
            if key != self.shard_meta_key(job, step, min(e.rank for e in entries)):
                raise IntegrityError(f"{self.url(key)}: record names ranks {[e.rank for e in entries]}")
            for e in entries:
                out[e.rank] = e
        return out

    def is_committed(self, job: str, step: int) -> bool:
        key = self.manifest_key(job, step)
        try:
            return self._store.head(key) is not None
        except STORE_ERRORS as exc:
            raise self._failed(f"checking {self.url(key)}", exc) from exc

    def range_bytes(self, chunk_bytes: int) -> int:
        """Size of one ranged GET: a whole number of chunks, about part_size_bytes."""
        return range_bytes(chunk_bytes, self.part_size_bytes)

    def read_shard_into(self, job: str, step: int, entry: ShardEntry, dst: memoryview) -> None:
        key = self._entry_key(job, step, entry)
        url = self.url(key)
        n = entry.nbytes
        view = byte_view(dst)
        if view.readonly or view.nbytes < n:
            raise ValueError(f"read_shard_into: dst must be writable and hold {n} bytes")
        view = view[:n]
        if len(entry.chunk_crc32c) != chunk_count(n, entry.chunk_bytes):
            raise IntegrityError(f"{url}: {len(entry.chunk_crc32c)} chunk checksums do not cover {n} bytes")
        deadline = time.monotonic() + self.total_timeout_s
        with self._deadlines.scope([key], deadline):
            try:
                head = self._head(key)
            except STORE_ERRORS as exc:
                raise self._failed(f"reading {url}", exc) from exc
            if head is None:
                raise NotFound(f"{url} is missing")
            size = int(head["ContentLength"])
            if size != n:
                raise IntegrityError(f"{url}: size {size} != {n} recorded in the manifest (truncated or replaced)")
            try:
                read_ranges_into(self._store, self._pool, key, str(head.get("ETag", "")), view, entry,
                                 self.range_bytes(entry.chunk_bytes), deadline, self.section.max_attempts)
            except (IntegrityError, NotFound):
                raise
            except STORE_ERRORS as exc:
                raise self._failed(f"reading {url}", exc) from exc

    def delete(self, job: str, step: int) -> None:
        mkey = self.manifest_key(job, step)
        keys: list[str] = []
        manifest: Manifest | None = None
        with contextlib.suppress(NotFound, IntegrityError):
            manifest = self.read_manifest(job, step)
        if manifest is not None:
            keys = [self._entry_key(job, step, s) for s in manifest.shards]
        try:
            # Un-commit first: once the manifest is gone the step is not listed, whatever
            # happens to the data below.
            self.client.delete_object(Bucket=self.bucket, Key=mkey)
            self.client.delete_object(Bucket=self.bucket, Key=self.claim_key(job, step))
            prefixes = [self.step_prefix(job, step)] if manifest is not None else self.step_shard_prefixes(job, step)
            for found in map_all(self._pool, self._store.list_keys, prefixes):
                keys.extend(found)
            map_all(self._pool, self._store.delete_key, sorted(set(keys)))
        except STORE_ERRORS as exc:
            raise self._failed(f"deleting {job}@{step}", exc) from exc

    # -- start-up and probes ----------------------------------------------------------------
    @property
    def stale_upload_age_s(self) -> float:
        """Age past which no live tier still works on a multipart upload or a commit claim."""
        s = self.section
        return s.total_timeout_s + s.max_attempts * (s.connect_timeout_s + s.read_timeout_s) + 60.0

    @property
    def has_failed_uploads(self) -> bool:
        return bool(self._failed_uploads)

    def abort_failed_uploads(self) -> list[tuple[str, str]]:
        """Abort what failed uploads left (their own abort may have failed with the store): call
        it between uploads. Keys whose listing or abort fails again stay for the next call."""
        aborted: list[tuple[str, str]] = []
        for key in sorted(self._failed_uploads):
            with self._deadlines.scope([key], time.monotonic() + self.total_timeout_s):
                try:
                    aborted += [(k, u) for k, u in abort_stale_uploads(self._store, key, 0) if k == key]
                except STORE_ERRORS as exc:
                    log.info("multipart uploads of %s not aborted yet: %s", self.url(key), exc)
                    continue
            self._failed_uploads.discard(key)
        if aborted:
            log.info("aborted %d multipart upload(s) left by failed uploads", len(aborted))
        return aborted

    def cleanup_incomplete(self, older_than_s: float) -> list[tuple[str, str]]:
        """Abort multipart uploads under this tier's prefix initiated more than older_than_s
        ago (by the store's clock); return the (key, upload_id) pairs aborted.

        Called at daemon start-up with ``stale_upload_age_s`` so that another daemon's live
        upload to the same prefix is left alone; 0 aborts everything (tests, ``ckptctl gc``).
        """
        try:
            aborted = abort_stale_uploads(self._store, self.base, older_than_s)
        except STORE_ERRORS as exc:
            raise self._failed("cleaning incomplete multipart uploads", exc) from exc
        if aborted:
            log.info("aborted %d incomplete multipart upload(s) under %s", len(aborted),
                     f"s3://{self.bucket}/{self.base}", extra={"tier": "object"})
        return aborted

    def conditional_put_supported(self) -> bool:
        """Whether the store honours create-only puts; probed once, on first use."""
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self.probe_conditional_put()
        return self._conditional

    def probe_conditional_put(self) -> bool:
        """Probe whether the store honours create-only puts (``object_commit.probe_create_only``);
        with ``conditional_put = "auto"`` the answer is kept. TierFailed when the store cannot be
        reached."""
        try:
            supported = probe_create_only(self._store, self.probe_key())
        except STORE_ERRORS as exc:
            raise self._failed("probing create-only puts", exc) from exc
        if self.section.conditional_put == "auto":
            self._conditional = supported
        return supported
