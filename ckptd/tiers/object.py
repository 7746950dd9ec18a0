"""Object tier: shards and manifests in an S3-compatible bucket (AWS S3, MinIO, Alibaba OSS).

Job: make a step durable beyond the cluster. Layout (DESIGN.md section 4) under ``{prefix}/``::

    {job}/step-{step:012d}/manifest.json                       the commit record, written last
    {job}/step-{step:012d}/rank-{rank:06d}.shard               shard objects (hashed_prefixes = 0)
    _shards/{h:04x}/{job}/step-{step:012d}/rank-{rank:06d}.shard   (hashed_prefixes = N > 0)

where ``h = sha256("{job}/{step}/{rank}") mod N`` spreads a step's shard writes over N key
prefixes (S3 throttles per prefix) while manifests stay under one listable prefix. The object
tier's manifest records each shard's full key (``ShardEntry.object_key``); reads use the
recorded key, so changing ``hashed_prefixes`` never strands committed steps. ``_shards`` and
``_ckptd`` are not valid job names, so ``list_jobs`` never mistakes them for jobs.

Invariants:
- Data first, manifest last. ``put_shard`` uploads with boto3's transfer manager (multipart over
  ``part_size_bytes`` with ``max_concurrency`` parts in flight) from a seekable view over the
  caller's memoryview; it never makes a step visible. ``commit`` checks every shard object
  exists with the recorded size, then writes ``manifest.json`` with a create-only put
  (``If-None-Match: *``; on OSS rewritten to ``x-oss-forbid-overwrite: true``). Support is
  probed once (``probe_conditional_put``); where the store ignores or rejects the condition, a
  claim object is used instead (see ``_commit_with_claim`` for its race semantics).
- A step without a manifest does not exist: ``list_committed`` lists
  ``{job}/step-*/manifest.json`` and nothing else.
- Integrity is ckptd's own: ``read_shard_into`` checks the object size and every chunk crc32c
  recorded in the manifest (computed at staging), never trusting the server; a mismatch raises
  IntegrityError naming ``s3://bucket/key``. Ranged GETs are pinned to the ETag seen first, so
  an object replaced mid-read is an IntegrityError too, never a mix of two versions.
- Every blocking call is bounded: botocore retries (``retry_mode``, ``max_attempts`` per
  request), connect/read timeouts, and ``total_timeout_s`` per put_shard / commit /
  read_shard_into. Botocore event hooks keyed by object key enforce the deadline: no request
  starts after it, and no retry back-off starts that could end after it; so a call returns at
  most one in-flight attempt (connect_timeout_s + read_timeout_s per socket wait), plus for a
  failed multipart upload one attempt at aborting it, after total_timeout_s. Failures are
  typed: TierFailed (store unreachable, throttled past the budget, refused), NotFound,
  AlreadyExists, IntegrityError.
- ``put_shard`` refuses (AlreadyExists) to write into a step that is already committed.
- ``read_shard_into`` never writes into ``dst`` after it returns: it waits for its workers.
- A failed upload aborts its multipart upload (s3transfer's failure cleanup); uploads the store
  could not be told about are aborted by ``cleanup_incomplete(older_than_s)``, run at start-up.
  No upload of a live tier runs longer than ``stale_upload_age_s``.
- Credentials come only from the standard AWS chain or a named profile; they are never logged:
  the botocore/boto3/urllib3/s3transfer loggers are pinned at WARNING or above (their DEBUG
  output contains the Authorization header), and no message here includes a header.

Methods are blocking; the daemon calls them from its I/O thread pool, never on the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.session
import s3transfer.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config as BotoConfig

from ckptd import metrics
from ckptd.config import ObjectSection, validate_object
from ckptd.errors import AlreadyExists, IntegrityError, NotFound, TierFailed
from ckptd.integrity import crc32c
from ckptd.layout import chunk_count
from ckptd.logs import ProgressLog
from ckptd.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    ShardEntry,
    _shard_from_obj,
    canonical_json,
)
from ckptd.types import TierName, parse_step_dirname, shard_key, step_dirname, validate_job, validate_step

SHARD_META_SUFFIX: Final = ".meta.json"
log = logging.getLogger("ckptd.object")

CLAIM_NAME: Final = "manifest.claim"
HASHED_DIR: Final = "_shards"
PROBE_DIR: Final = "_ckptd"
COMMIT_TOKEN_META: Final = "ckptd-commit"  # x-amz-meta-ckptd-commit: who wrote a manifest
READ_BLOCK_BYTES: Final = 4 * 2**20  # one readinto per block while streaming a range
SDK_LOGGERS: Final = ("botocore", "boto3", "urllib3", "s3transfer")
_DEADLINE_CTX: Final = "ckptd_deadline_mono_s"
MAX_BACKOFF_S: Final = 20.0  # botocore's cap on one retry back-off (standard and adaptive modes)

T = TypeVar("T")


@dataclass(frozen=True)
class Preset:
    """Backend defaults that ``[object]`` keys override one by one."""

    addressing_style: str
    request_checksum_calculation: str
    response_checksum_validation: str
    forbid_overwrite_header: bool  # OSS: x-oss-forbid-overwrite instead of If-None-Match


PRESETS: Final[dict[str, Preset]] = {
    "aws": Preset("auto", "when_supported", "when_supported", False),
    "minio": Preset("path", "when_supported", "when_supported", False),
    # OSS's S3-compatible API rejects the flexible-checksum headers (and aws-chunked bodies)
    # botocore sends by default: send checksums only where an operation requires them.
    "oss": Preset("virtual", "when_required", "when_required", True),
}


def pin_sdk_loggers() -> None:
    """Keep the SDK loggers at WARNING or above: at DEBUG they print signed request headers."""
    for name in SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:  # NOTSET (0) included: it would inherit DEBUG
            logger.setLevel(logging.WARNING)


def oss_endpoint(region: str) -> str:
    """Alibaba OSS public endpoint of a region ("cn-hangzhou" or "oss-cn-hangzhou")."""
    return f"https://oss-{region.removeprefix('oss-')}.aliyuncs.com"


_LOADER: list[Any] = []
_LOADER_LOCK = threading.Lock()


def _shared_loader() -> Any:
    """One botocore data loader per process: each new one re-parses the S3 model (~0.4 s)."""
    with _LOADER_LOCK:
        if not _LOADER:
            _LOADER.append(botocore.loaders.create_loader())
        return _LOADER[0]


class _DeadlineExceeded(Exception):
    """Raised from a botocore hook when an operation's total_timeout_s has passed."""


class _ShortBody(Exception):
    """A ranged GET's body ended early or broke off: botocore does not retry that, we do."""


class _MemoryReader(io.RawIOBase):
    """A read-only, seekable file over a memoryview, for upload_fileobj.

    s3transfer reads one part at a time from it (one bounded copy per part, never a copy of the
    whole buffer) and seeks back to retry a part.
    """

    def __init__(self, view: memoryview, progress: ProgressLog | None = None) -> None:
        super().__init__()
        self._view = view
        self._pos = 0
        self._progress = progress

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._view.nbytes}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._view.nbytes if size is None or size < 0 else min(self._pos + size, self._view.nbytes)
        start = min(self._pos, end)
        self._pos = end
        if self._progress is not None:
            self._progress.update(end - start)
        return bytes(self._view[start:end])

    def readinto(self, buf: Any) -> int:
        out = memoryview(buf).cast("B")
        end = min(self._pos + out.nbytes, self._view.nbytes)
        n = max(0, end - self._pos)
        out[:n] = self._view[self._pos : end]
        self._pos = end
        if self._progress is not None:
            self._progress.update(n)
        return n


def _byte_view(buf: memoryview) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _http_status(exc: BaseException) -> int:
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return 0


def _is_missing(exc: BaseException) -> bool:
    """The key does not exist (a missing bucket is a failure of the tier, not a missing key)."""
    code = _error_code(exc)
    return code != "NoSuchBucket" and (code in ("NoSuchKey", "404", "NotFound") or _http_status(exc) == 404)


#: Errors of the store or the transport; anything else is a bug and propagates as is.
_STORE_ERRORS: Final = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    s3transfer.exceptions.RetriesExceededError,
    s3transfer.exceptions.CancelledError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    _DeadlineExceeded,
    _ShortBody,
    OSError,
)

#: Errors while streaming a body (after botocore returned the response, so it never retries them).
_STREAM_ERRORS: Final = (
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class ObjectTier:
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
        self.section = section
        self.bucket = section.bucket
        self.preset = PRESETS[section.preset]
        prefix = section.prefix.strip("/")
        self.base = f"{prefix}/" if prefix else ""
        self.part_size_bytes = section.part_size_bytes
        self.total_timeout_s = section.total_timeout_s
        self.endpoint_url = self._endpoint(section)
        self.client = self._make_client(section, client_config)
        self._transfer = create_transfer_manager(
            self.client,
            TransferConfig(
                multipart_threshold=section.part_size_bytes,
                multipart_chunksize=section.part_size_bytes,
                max_concurrency=section.max_concurrency,
                num_download_attempts=section.max_attempts,
                use_threads=True,
                preferred_transfer_client="classic",
            ),
        )
        self._pool = ThreadPoolExecutor(section.max_concurrency, thread_name_prefix="ckptd-object")
        self._deadlines: dict[str, float] = {}
        self._deadlines_lock = threading.Lock()
        self._conditional: bool | None = {"on": True, "off": False}.get(section.conditional_put)
        self._probe_lock = threading.Lock()
        self._register_hooks()

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def _endpoint(section: ObjectSection) -> str | None:
        if section.endpoint_url:
            return section.endpoint_url.rstrip("/")
        if section.preset == "oss":
            return oss_endpoint(section.region)
        return None

    def _make_client(self, section: ObjectSection, extra: Any) -> Any:
        region = section.region.removeprefix("oss-") if section.preset == "oss" else section.region
        if not region and section.preset != "aws":
            region = "us-east-1"  # MinIO's default; signing needs some region
        cfg = BotoConfig(
            region_name=region or None,
            signature_version="s3v4",
            s3={"addressing_style": section.addressing_style or self.preset.addressing_style},
            retries={"total_max_attempts": section.max_attempts, "mode": section.retry_mode},
            connect_timeout=section.connect_timeout_s,
            read_timeout=section.read_timeout_s,
            max_pool_connections=2 * section.max_concurrency + 4,
            tcp_keepalive=True,
            request_checksum_calculation=(
                section.request_checksum_calculation or self.preset.request_checksum_calculation
            ),
            response_checksum_validation=(
                section.response_checksum_validation or self.preset.response_checksum_validation
            ),
        )
        if extra is not None:
            cfg = cfg.merge(extra)
        try:
            core = botocore.session.Session(profile=section.profile or None)
            core.register_component("data_loader", _shared_loader())  # parsed service models, reused
            session = boto3.session.Session(botocore_session=core)
            return session.client("s3", endpoint_url=self.endpoint_url, config=cfg)
        except botocore.exceptions.BotoCoreError as exc:
            raise TierFailed(f"object tier: cannot create the S3 client: {exc}") from exc

    def _register_hooks(self) -> None:
        events = self.client.meta.events
        events.register("before-parameter-build.s3", self._hook_attach_deadline)
        events.register("request-created.s3", self._hook_check_deadline)
        events.register("needs-retry.s3", self._hook_stop_retrying)
        if self.preset.forbid_overwrite_header:
            events.register("before-sign.s3.PutObject", _hook_oss_forbid_overwrite)

    def close(self) -> None:
        """Release the transfer manager's and the reader's threads."""
        self._transfer.shutdown()
        self._pool.shutdown(wait=True)

    # -- deadlines --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _deadline(self, keys: Sequence[str], deadline_mono_s: float) -> Iterator[None]:
        """Every request on ``keys`` made until exit stops starting after deadline_mono_s."""
        with self._deadlines_lock:
            for k in keys:
                self._deadlines[k] = deadline_mono_s
        try:
            yield
        finally:
            with self._deadlines_lock:
                for k in keys:
                    if self._deadlines.get(k) == deadline_mono_s:
                        del self._deadlines[k]

    def _hook_attach_deadline(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        key = params.get("Key")
        if isinstance(key, str):
            with self._deadlines_lock:
                deadline = self._deadlines.get(key)
            if deadline is not None:
                context[_DEADLINE_CTX] = deadline

    @staticmethod
    def _hook_check_deadline(request: Any, operation_name: str, **_: Any) -> None:
        """No request starts after the deadline, except the first attempt of the abort of a
        failed multipart upload (s3transfer's failure cleanup): one bounded attempt to leave
        nothing behind is worth it; if it fails too, cleanup_incomplete finds the upload."""
        context = getattr(request, "context", {})
        deadline = context.get(_DEADLINE_CTX)
        if deadline is None or time.monotonic() < deadline:
            return
        if operation_name == "AbortMultipartUpload" and context.get("retries", {}).get("attempt", 1) == 1:
            return
        raise _DeadlineExceeded(f"{operation_name} not started: total_timeout_s has passed")

    @staticmethod
    def _hook_stop_retrying(
        request_dict: dict[str, Any], response: Any, caught_exception: Any, attempts: int, **_: Any
    ) -> None:
        """Runs after botocore's retry handler chose a back-off and before it sleeps: refuse a
        retry whose back-off could end past the deadline (botocore's standard/adaptive back-off
        after attempt n is below min(20, 2**(n-1)) seconds). So no sleep outlives the deadline."""
        status = response[0].status_code if response is not None else 0
        if caught_exception is None and status < 500 and status != 429:
            return  # success or a final client error: nothing to retry
        metrics.OBJECT_RETRIES.inc()
        deadline = request_dict.get("context", {}).get(_DEADLINE_CTX)
        if deadline is None:
            return
        if time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (attempts - 1)) > deadline:
            raise _DeadlineExceeded(
                f"not retrying after {caught_exception or status} (attempt {attempts}): the back-off "
                "would pass total_timeout_s"
            )

    # -- keys -------------------------------------------------------------------------------
    def step_prefix(self, job: str, step: int) -> str:
        return f"{self.base}{validate_job(job)}/{step_dirname(validate_step(step))}/"

    def manifest_key(self, job: str, step: int) -> str:
        return self.step_prefix(job, step) + MANIFEST_NAME

    def claim_key(self, job: str, step: int) -> str:
        return self.step_prefix(job, step) + CLAIM_NAME

    def hashed_dir(self, index: int) -> str:
        return f"{self.base}{HASHED_DIR}/{index:04x}/"

    def shard_object_key(self, job: str, step: int, rank: int) -> str:
        """Where put_shard stores rank's shard under the current configuration."""
        n = self.section.hashed_prefixes
        if n <= 0:
            return self.step_prefix(job, step) + shard_key(rank)
        digest = hashlib.sha256(f"{job}/{step}/{rank}".encode()).digest()
        index = int.from_bytes(digest[:8], "big") % n
        return f"{self.hashed_dir(index)}{validate_job(job)}/{step_dirname(step)}/{shard_key(rank)}"

    def _entry_key(self, job: str, step: int, entry: ShardEntry) -> str:
        """The object key of entry: the recorded one (checked to be one this layout can produce
        for job/step/rank, so a hostile manifest cannot point reads or deletes elsewhere), or
        the configured one when none is recorded."""
        if not entry.object_key:
            return self.shard_object_key(job, step, entry.rank)
        tail = f"{validate_job(job)}/{step_dirname(step)}/{shard_key(entry.rank)}"
        hashed = re.escape(f"{self.base}{HASHED_DIR}/") + r"[0-9a-f]{4}/" + re.escape(tail)
        if entry.object_key != self.base + tail and not re.fullmatch(hashed, entry.object_key):
            raise IntegrityError(
                f"s3://{self.bucket}: manifest of {job}@{step} names object key {entry.object_key!r} "
                "outside this tier's layout"
            )
        return entry.object_key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _failed(self, what: str, exc: BaseException) -> TierFailed:
        if isinstance(exc, _DeadlineExceeded):
            return TierFailed(f"object tier: {what}: did not finish within {self.total_timeout_s:g}s ({exc})")
        return TierFailed(f"object tier: {what}: {type(exc).__name__}: {exc}")

    # -- small requests ---------------------------------------------------------------------
    def _head(self, key: str) -> dict[str, Any] | None:
        """HEAD key; None when it does not exist."""
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=key))
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return None
            raise

    def _get_small(self, key: str, limit_bytes: int) -> bytes | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        body = resp["Body"]
        try:
            if int(resp.get("ContentLength", 0)) > limit_bytes:
                raise IntegrityError(f"{self.url(key)}: larger than {limit_bytes} bytes")
            return bytes(body.read())
        finally:
            body.close()

    def _map(self, fn: Callable[[str], T], keys: Sequence[str]) -> list[T]:
        """fn over keys on the tier's pool; waits for all, raises the first error."""
        futures: list[Future[T]] = [self._pool.submit(fn, k) for k in keys]
        results: list[T] = []
        first: BaseException | None = None
        for fut in futures:
            try:
                results.append(fut.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below once all are done
                first = first or exc
        if first is not None:
            raise first
        return results

    # -- Tier protocol ----------------------------------------------------------------------
    def put_shard(self, job: str, step: int, entry: ShardEntry, src: memoryview) -> None:
        view = _byte_view(src)
        if view.nbytes != entry.nbytes:
            raise ValueError(f"shard {entry.rank}: {view.nbytes} bytes given, {entry.nbytes} expected")
        key = self.shard_object_key(job, step, entry.rank)
        mkey = self.manifest_key(job, step)
        deadline = time.monotonic() + self.total_timeout_s
        started = time.monotonic()
        with self._deadline([key, mkey], deadline):
            try:
                # Never overwrite a shard of a committed step (its manifest's checksums would lie).
                if self._head(mkey) is not None:
                    raise AlreadyExists(f"{job}@{step} is already committed in {self.url(mkey)}")
                progress = ProgressLog(log, f"uploading {self.url(key)}", view.nbytes, job=job, step=step,
                                       rank=entry.rank, tier="object")
                future = self._transfer.upload(
                    _MemoryReader(view, progress), self.bucket, key,
                    extra_args={"ContentType": "application/octet-stream"},
                )
                future.result()
            except _STORE_ERRORS as exc:
                raise self._failed(f"uploading {job}@{step} rank {entry.rank} to {self.url(key)}", exc) from exc
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
        with self._deadline([mkey, ckey, *keys], deadline):
            try:
                heads = self._map(self._head, keys)
            except _STORE_ERRORS as exc:
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
                    self._commit_conditional(mkey, body, token, deadline)
                else:
                    self._commit_with_claim(mkey, ckey, body, token)
            except _STORE_ERRORS as exc:
                raise self._failed(f"committing {job}@{step} to {self.url(mkey)}", exc) from exc

    def _put_manifest(self, key: str, body: bytes, token: str, create_only: bool) -> None:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}
        self.client.put_object(
            Bucket=self.bucket, Key=key, Body=body, ContentType="application/json",
            Metadata={COMMIT_TOKEN_META: token}, **extra,
        )

    def _written_by(self, key: str) -> str | None:
        """The commit token of an existing manifest ("" when it has none), None when absent."""
        head = self._head(key)
        if head is None:
            return None
        return str(head.get("Metadata", {}).get(COMMIT_TOKEN_META, ""))

    def _commit_conditional(self, key: str, body: bytes, token: str, deadline: float) -> None:
        while True:
            try:
                self._put_manifest(key, body, token, create_only=True)
                return
            except botocore.exceptions.ClientError as exc:
                if _http_status(exc) not in (409, 412):
                    raise
            # The condition failed: someone wrote the manifest, or our own first attempt did and
            # its answer was lost before botocore retried it (then the token is ours).
            owner = self._written_by(key)
            if owner == token:
                return
            if owner is not None:
                raise AlreadyExists(f"already committed: {self.url(key)} exists")
            if time.monotonic() >= deadline:  # 409 ConditionalRequestConflict that never settles
                raise _DeadlineExceeded("conditional put kept conflicting")
            time.sleep(0.2)

    def _commit_with_claim(self, mkey: str, ckey: str, body: bytes, token: str) -> None:
        """Commit on a store without create-only puts.

        1. a manifest exists -> AlreadyExists;
        2. a live claim by another writer (younger than stale_upload_age_s) -> AlreadyExists;
        3. put our claim, read it back: another token won the last write -> AlreadyExists;
        4. check the manifest is still absent, put it, drop the claim.
        Race semantics: with strong read-after-write consistency (S3, MinIO, OSS) two writers
        can both pass only if one does all of steps 3-4 between the other's claim read-back and
        manifest put; the later manifest put then wins. ckptd has one writer per step (the
        step's coordinator), and a canonical manifest of the same step is the same bytes, so
        that window only matters to a mis-configured pair of coordinators. A claim left by a
        crashed writer blocks the step until it is stale_upload_age_s old.
        """
        if self._head(mkey) is not None:
            raise AlreadyExists(f"already committed: {self.url(mkey)} exists")
        raw = self._get_small(ckey, 4096)
        if raw is not None:
            other, created = _claim_token(raw), _claim_created(raw)
            if other != token and time.time() - created < self.stale_upload_age_s:
                raise AlreadyExists(f"{self.url(mkey)} is being committed by another writer ({self.url(ckey)})")
        claim_body = json.dumps({"token": token, "created_unix_s": time.time()}).encode()
        self.client.put_object(Bucket=self.bucket, Key=ckey, Body=claim_body, ContentType="application/json")
        raw = self._get_small(ckey, 4096)
        if raw is None or _claim_token(raw) != token:
            raise AlreadyExists(f"{self.url(mkey)}: another writer claimed it ({self.url(ckey)})")
        if self._head(mkey) is not None:
            raise AlreadyExists(f"already committed: {self.url(mkey)} exists")
        self._put_manifest(mkey, body, token, create_only=False)
        with contextlib.suppress(*_STORE_ERRORS):
            self.client.delete_object(Bucket=self.bucket, Key=ckey)

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
        except _STORE_ERRORS as exc:
            raise self._failed("listing jobs", exc) from exc
        return sorted(jobs)

    def list_committed(self, job: str) -> list[int]:
        job_prefix = f"{self.base}{validate_job(job)}/"
        steps: set[int] = set()
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=job_prefix
            ):
                for obj in page.get("Contents", ()):
                    rest = str(obj["Key"])[len(job_prefix) :]
                    step_name, sep, name = rest.partition("/")
                    if sep and name == MANIFEST_NAME:
                        step = parse_step_dirname(step_name)
                        if step is not None:
                            steps.add(step)
        except _STORE_ERRORS as exc:
            raise self._failed(f"listing the steps of {job}", exc) from exc
        return sorted(steps)

    def read_manifest(self, job: str, step: int) -> Manifest:
        key = self.manifest_key(job, step)
        try:
            data = self._get_small(key, MAX_MANIFEST_BYTES)
        except _STORE_ERRORS as exc:
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

    # -- multi-node commit: one record per rank beside the (future) manifest ----------------
    def shard_meta_key(self, job: str, step: int, rank: int) -> str:
        return self.step_prefix(job, step) + shard_key(rank) + SHARD_META_SUFFIX

    def put_shard_meta(self, job: str, step: int, entry: ShardEntry, world_size: int) -> None:
        """Record that rank's shard is uploaded, with its layout and checksums. The step's
        coordinator builds the manifest from these records once all ``world_size`` are there."""
        key = self.shard_meta_key(job, step, entry.rank)
        body = canonical_json({"world_size": world_size, "shard": entry.to_json()})
        deadline = time.monotonic() + self.total_timeout_s
        with self._deadline([key], deadline):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json")
            except _STORE_ERRORS as exc:
                raise self._failed(f"recording {job}@{step} rank {entry.rank} at {self.url(key)}", exc) from exc

    def list_shard_metas(self, job: str, step: int, world_size: int) -> dict[int, ShardEntry]:
        """The per-rank records of a step uploaded so far (rank -> entry); invalid ones raise."""
        prefix = self.step_prefix(job, step)
        try:
            keys = [k for k in self._list_keys(prefix) if k.endswith(SHARD_META_SUFFIX)]
            bodies = self._map(lambda k: self._get_small(k, MAX_MANIFEST_BYTES), keys)
        except _STORE_ERRORS as exc:
            raise self._failed(f"listing the shard records of {job}@{step}", exc) from exc
        out: dict[int, ShardEntry] = {}
        for key, body in zip(keys, bodies):
            if body is None:
                continue
            try:
                obj = json.loads(body)
                if obj["world_size"] != world_size:
                    raise ValueError(f"world_size {obj['world_size']} != {world_size}")
                entry = _shard_from_obj(obj["shard"])
            except (ValueError, KeyError, TypeError) as exc:
                raise IntegrityError(f"{self.url(key)}: invalid shard record: {exc}") from None
            if key != self.shard_meta_key(job, step, entry.rank) or not 0 <= entry.rank < world_size:
                raise IntegrityError(f"{self.url(key)}: record names rank {entry.rank}")
            out[entry.rank] = entry
        return out

    def range_bytes(self, chunk_bytes: int) -> int:
        """Size of one ranged GET: a whole number of chunks, about part_size_bytes."""
        if chunk_bytes >= self.part_size_bytes:
            return chunk_bytes
        return self.part_size_bytes // chunk_bytes * chunk_bytes

    def read_shard_into(self, job: str, step: int, entry: ShardEntry, dst: memoryview) -> None:
        key = self._entry_key(job, step, entry)
        url = self.url(key)
        n = entry.nbytes
        view = _byte_view(dst)
        if view.readonly or view.nbytes < n:
            raise ValueError(f"read_shard_into: dst must be writable and hold {n} bytes")
        view = view[:n]
        cb = entry.chunk_bytes
        if len(entry.chunk_crc32c) != chunk_count(n, cb):
            raise IntegrityError(f"{url}: {len(entry.chunk_crc32c)} chunk checksums do not cover {n} bytes")
        deadline = time.monotonic() + self.total_timeout_s
        with self._deadline([key], deadline):
            try:
                head = self._head(key)
            except _STORE_ERRORS as exc:
                raise self._failed(f"reading {url}", exc) from exc
            if head is None:
                raise NotFound(f"{url} is missing")
            size = int(head["ContentLength"])
            if size != n:
                raise IntegrityError(f"{url}: size {size} != {n} recorded in the manifest (truncated or replaced)")
            etag = str(head.get("ETag", ""))
            step_bytes = self.range_bytes(cb)
            stop = threading.Event()

            def fetch(start: int) -> None:
                try:
                    self._fetch_range(key, etag, view, start, min(start + step_bytes, n), entry, deadline, stop)
                except BaseException:
                    stop.set()  # the others stop at their next block
                    raise

            try:
                self._map_offsets(fetch, range(0, n, step_bytes))
            except (IntegrityError, NotFound):
                raise
            except _STORE_ERRORS as exc:
                raise self._failed(f"reading {url}", exc) from exc

    def _map_offsets(self, fn: Callable[[int], None], offsets: range) -> None:
        futures = [self._pool.submit(fn, off) for off in offsets]
        errors: list[BaseException] = []
        for fut in futures:  # wait for every worker: none may write into dst after we return
            exc = fut.exception()
            if exc is not None:
                errors.append(exc)
        if errors:
            errors.sort(key=lambda e: 0 if isinstance(e, IntegrityError) else 1)
            raise errors[0]

    def _fetch_range(
        self, key: str, etag: str, view: memoryview, start: int, end: int, entry: ShardEntry,
        deadline: float, stop: threading.Event,
    ) -> None:
        """Fill view[start:end] from one ranged GET (retried on body-stream errors), then check
        the chunks it covers."""
        url = self.url(key)
        attempt = 0
        while True:
            attempt += 1
            if stop.is_set():
                return
            if time.monotonic() >= deadline:
                raise _DeadlineExceeded(f"range {start}-{end}")
            try:
                self._get_range_into(key, etag, view, start, end, deadline, stop)
                break
            except botocore.exceptions.ClientError as exc:
                if _http_status(exc) == 412 or _error_code(exc) == "PreconditionFailed":
                    raise IntegrityError(f"{url}: object replaced while it was read") from None
                if _is_missing(exc):
                    raise NotFound(f"{url} disappeared while it was read") from None
                raise
            except _ShortBody as exc:
                if attempt >= self.section.max_attempts:
                    raise
                log.info("%s: range %d-%d attempt %d failed (%s), retrying", url, start, end, attempt, exc)
                time.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic()), 2.0))
        if stop.is_set():
            return
        cb = entry.chunk_bytes
        for i in range(start // cb, chunk_count(end, cb)):
            off = i * cb
            if crc32c(view[off : min(off + cb, entry.nbytes)]) != entry.chunk_crc32c[i]:
                raise IntegrityError(f"{url}: crc32c mismatch in chunk {i} (offset {off})")

    def _get_range_into(
        self, key: str, etag: str, view: memoryview, start: int, end: int, deadline: float,
        stop: threading.Event,
    ) -> None:
        want = end - start
        if want == 0:
            return
        extra = {"IfMatch": etag} if etag else {}
        resp = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra)
        body = resp["Body"]
        done = False
        try:
            if int(resp.get("ContentLength", -1)) != want:
                raise _ShortBody(f"range {start}-{end}: server sent {resp.get('ContentLength')} bytes")
            raw = getattr(body, "_raw_stream", None)
            fp = getattr(raw, "_fp", None)
            # Fast path: straight from the socket into dst (urllib3's readinto copies through a
            # temporary bytes object). Only for an un-encoded body.
            direct = isinstance(fp, http.client.HTTPResponse) and not resp.get("ContentEncoding")
            readinto = fp.readinto if direct and fp is not None else body.readinto
            got = 0
            while got < want:
                if stop.is_set():
                    return
                if time.monotonic() >= deadline:
                    raise _DeadlineExceeded(f"range {start}-{end} at {got} bytes")
                try:
                    k = readinto(view[start + got : start + min(want, got + READ_BLOCK_BYTES)])
                except _STREAM_ERRORS as exc:
                    raise _ShortBody(f"range {start}-{end}: body broke off at {got} of {want} bytes: {exc}") from exc
                if not k:
                    raise _ShortBody(f"range {start}-{end}: body ended at {got} of {want} bytes")
                got += k
            done = True
        finally:
            if done and raw is not None and hasattr(raw, "release_conn"):
                raw.release_conn()  # fully read: the connection goes back to the pool
            else:
                body.close()

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
            prefixes = [self.step_prefix(job, step)]
            if manifest is None and self.section.hashed_prefixes > 0:
                tail = f"{job}/{step_dirname(step)}/"
                prefixes += [self.hashed_dir(i) + tail for i in range(self.section.hashed_prefixes)]
            for found in self._map(self._list_keys, prefixes):
                keys.extend(found)
            self._map(self._delete_key, sorted(set(keys)))
        except _STORE_ERRORS as exc:
            raise self._failed(f"deleting {job}@{step}", exc) from exc

    def _list_keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(str(o["Key"]) for o in page.get("Contents", ()))
        return out

    def _delete_key(self, key: str) -> None:
        # One DeleteObject per key: DeleteObjects requires a body checksum header that some
        # S3-compatible stores (OSS) reject in the form botocore sends it.
        self.client.delete_object(Bucket=self.bucket, Key=key)

    # -- start-up and probes ----------------------------------------------------------------
    @property
    def stale_upload_age_s(self) -> float:
        """Age past which no live tier still works on a multipart upload or a commit claim."""
        s = self.section
        return s.total_timeout_s + s.max_attempts * (s.connect_timeout_s + s.read_timeout_s) + 60.0

    def cleanup_incomplete(self, older_than_s: float) -> list[tuple[str, str]]:
        """Abort multipart uploads under this tier's prefix initiated more than older_than_s
        ago (by the store's clock); return the (key, upload_id) pairs aborted.

        Called at daemon start-up with ``stale_upload_age_s`` so that another daemon's live
        upload to the same prefix is left alone; 0 aborts everything (tests, ``ckptctl gc``).
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        aborted: list[tuple[str, str]] = []
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.base
            ):
                for up in page.get("Uploads", ()):
                    initiated = up.get("Initiated")
                    if older_than_s > 0 and isinstance(initiated, datetime) and initiated > cutoff:
                        continue
                    try:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    except botocore.exceptions.ClientError as exc:
                        if _error_code(exc) != "NoSuchUpload":
                            raise
                    aborted.append((str(up["Key"]), str(up["UploadId"])))
        except _STORE_ERRORS as exc:
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

    def _probed(self, supported: bool) -> bool:
        if self.section.conditional_put == "auto":
            self._conditional = supported
        return supported

    def probe_conditional_put(self) -> bool:
        """Put a probe object twice with the create-only condition: supported when the second
        put is refused (412/409). A store that rejects the header outright (400/501) or
        ignores it (second put succeeds) is not. TierFailed when the store cannot be reached."""
        key = f"{self.base}{PROBE_DIR}/probe-{uuid.uuid4().hex}"
        try:
            try:
                self._put_manifest(key, b"{}", "probe", create_only=True)
            except botocore.exceptions.ClientError as exc:
                if _http_status(exc) in (400, 403, 501) or _error_code(exc) in ("NotImplemented", "InvalidArgument"):
                    log.warning("object store refuses create-only puts (%s): using commit claims", _error_code(exc))
                    return self._probed(False)
                raise
            try:
                self._put_manifest(key, b"{}", "probe", create_only=True)
            except botocore.exceptions.ClientError as exc:
                if _http_status(exc) in (409, 412):
                    return self._probed(True)
                raise
            log.warning("object store ignores create-only puts: using commit claims")
            return self._probed(False)
        except _STORE_ERRORS as exc:
            raise self._failed("probing create-only puts", exc) from exc
        finally:
            with contextlib.suppress(*_STORE_ERRORS):
                self.client.delete_object(Bucket=self.bucket, Key=key)


def _claim_field(raw: bytes, name: str) -> Any:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return obj.get(name) if isinstance(obj, dict) else None


def _claim_token(raw: bytes) -> str:
    token = _claim_field(raw, "token")
    return token if isinstance(token, str) else ""


def _claim_created(raw: bytes) -> float:
    created = _claim_field(raw, "created_unix_s")
    return float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else 0.0


def _hook_oss_forbid_overwrite(request: Any, **_: Any) -> None:
    """OSS spells a create-only put ``x-oss-forbid-overwrite: true``."""
    if request.headers.get("If-None-Match") == "*":
        del request.headers["If-None-Match"]
        request.headers["x-oss-forbid-overwrite"] = "true"
