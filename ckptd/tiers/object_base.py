"""The object tier's plumbing: client, pool and deadlines, listings and manifests, per-node
records (each read once), the one-HEAD commit check, start-up clean-up and the create-only
probe. ``ObjectTier`` (object.py) adds the data path (chunks, commit, reads, deletes) on top.

Invariants: see object.py; every store error leaves here typed (``_failed``: TierFailed), a
manifest read is validated (IntegrityError naming its ``s3://bucket/key``), and listings see
only committed steps (``{job}/step-*/manifest.json``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptd.core.config.object import ObjectSection, validate_object
from ckptd.core.errors import IntegrityError, NotFound, TierFailed
from ckptd.core.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ShardEntry
from ckptd.core.types import TierName, parse_step_dirname, validate_job
from ckptd.tiers.object_client import (
    PRESETS,
    STORE_ERRORS,
    Bucket,
    DeadlineExceeded,
    Deadlines,
    endpoint_url,
    make_client,
    pin_sdk_loggers,
)
from ckptd.tiers.object_commit import parse_shard_record, probe_create_only
from ckptd.tiers.object_io import abort_stale_uploads, map_all, range_bytes
from ckptd.tiers.object_layout import SHARD_META_SUFFIX, ObjectLayout

log = logging.getLogger("ckptd.object")


class ObjectBase(ObjectLayout):
    """The store, its client and the requests that are not the data path."""

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
        self._pool = ThreadPoolExecutor(section.max_concurrency, thread_name_prefix="ckptd-object")
        self._deadlines = Deadlines()
        self._conditional: bool | None = {"on": True, "off": False}.get(section.conditional_put)
        self._probe_lock = threading.Lock()
        self._deadlines.register(self.client, forbid_overwrite_header=self.preset.forbid_overwrite_header)

    def close(self) -> None:
        """Release the pool's threads."""
        self._pool.shutdown(wait=True)

    def url(self, key: str) -> str:
        return self._store.url(key)

    def _failed(self, what: str, exc: BaseException) -> TierFailed:
        if isinstance(exc, DeadlineExceeded):
            return TierFailed(f"object tier: {what}: did not finish within {self.total_timeout_s:g}s ({exc})")
        return TierFailed(f"object tier: {what}: {type(exc).__name__}: {exc}")

    def _head(self, key: str) -> dict[str, Any] | None:
        """HEAD key; None when it does not exist (store errors raw)."""
        return self._store.head(key)

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

    def newest_committed_before(self, job: str, step: int) -> int | None:
        """The newest committed step of job older than step: the job's step folders from a
        delimited listing (a page per 1,000 steps, never the keys of their chunks), then a HEAD
        of each one's manifest from the newest down. ``list_committed`` pages over every key of
        the job instead, which a job of thousands of ranks cannot afford per upload."""
        job_prefix = self.job_prefix(job)
        steps: list[int] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=job_prefix, Delimiter="/"
            ):
                for cp in page.get("CommonPrefixes", ()):
                    found = parse_step_dirname(str(cp["Prefix"])[len(job_prefix):].rstrip("/"))
                    if found is not None and found < step:
                        steps.append(found)
            for found in sorted(steps, reverse=True):
                if self._store.head(self.manifest_key(job, found)) is not None:
                    return found
        except STORE_ERRORS as exc:
            raise self._failed(f"looking for the newest committed step of {job} before {step}", exc) from exc
        return None

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
        """Whether step's manifest is in the store: one HEAD, never a listing of the job."""
        key = self.manifest_key(job, step)
        try:
            return self._store.head(key) is not None
        except STORE_ERRORS as exc:
            raise self._failed(f"checking {self.url(key)}", exc) from exc

    def range_bytes(self, chunk_bytes: int) -> int:
        """Size of one ranged GET: a whole number of chunks, about part_size_bytes."""
        return range_bytes(chunk_bytes, self.part_size_bytes)

    @property
    def stale_upload_age_s(self) -> float:
        """Age past which no live tier still works on a multipart upload or a commit claim."""
        s = self.section
        return s.total_timeout_s + s.max_attempts * (s.connect_timeout_s + s.read_timeout_s) + 60.0

    @property
    def has_failed_uploads(self) -> bool:
        """Never: chunks are single PUTs, which leave no partial upload behind."""
        return False

    def abort_failed_uploads(self) -> list[tuple[str, str]]:
        """Nothing to abort (``has_failed_uploads``); multipart uploads of older versions are
        aborted by ``cleanup_incomplete``."""
        return []

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
