"""The object tier's boto3 client: construction, presets, deadlines and error classification.

Job: turn an ``[object]`` section into one S3 client that every request of the tier goes
through, and keep each of those requests bounded in time.

Invariants:
- One client per tier, built from the section and its preset (``aws``, ``minio``, ``oss``): a
  section key overrides the preset's default one by one. Signing always uses SigV4 and some
  region (MinIO's ``us-east-1`` when none is configured off AWS).
- Credentials come only from the standard AWS chain or a named profile; they are never logged:
  the botocore/boto3/urllib3/s3transfer loggers are pinned at WARNING or above (their DEBUG
  output contains the Authorization header), and no message of the tier includes a header.
- Deadlines are keyed by object key (``Deadlines.scope``): no request on a key in scope starts
  after its deadline, and no retry back-off starts that could end after it; the one exception is
  the first attempt at aborting a failed multipart upload (one bounded attempt to leave nothing
  behind). So a call returns at most one in-flight attempt after its deadline.
- ``STORE_ERRORS`` are the errors of the store or the transport; anything else is a bug and
  propagates as is. A missing bucket is a failure of the tier, never a missing key.
- On OSS a create-only put (``If-None-Match: *``) is sent as ``x-oss-forbid-overwrite: true``.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.session
import s3transfer.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config as BotoConfig

from ckptd.core import metrics
from ckptd.core.config import ObjectSection
from ckptd.core.errors import IntegrityError, TierFailed

SDK_LOGGERS: Final = ("botocore", "boto3", "urllib3", "s3transfer")
MAX_BACKOFF_S: Final = 20.0  # botocore's cap on one retry back-off (standard and adaptive modes)
_DEADLINE_CTX: Final = "ckptd_deadline_mono_s"


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


def endpoint_url(section: ObjectSection) -> str | None:
    """The configured endpoint; the region's public one on OSS; None for AWS's default."""
    if section.endpoint_url:
        return section.endpoint_url.rstrip("/")
    if section.preset == "oss":
        return oss_endpoint(section.region)
    return None


def make_client(section: ObjectSection, preset: Preset, endpoint: str | None, extra: Any) -> Any:
    """The S3 client of a section; ``extra`` (a botocore Config) is merged over it."""
    region = section.region.removeprefix("oss-") if section.preset == "oss" else section.region
    if not region and section.preset != "aws":
        region = "us-east-1"  # MinIO's default; signing needs some region
    cfg = BotoConfig(
        region_name=region or None,
        signature_version="s3v4",
        s3={"addressing_style": section.addressing_style or preset.addressing_style},
        retries={"total_max_attempts": section.max_attempts, "mode": section.retry_mode},
        connect_timeout=section.connect_timeout_s,
        read_timeout=section.read_timeout_s,
        max_pool_connections=2 * section.max_concurrency + 4,
        tcp_keepalive=True,
        request_checksum_calculation=section.request_checksum_calculation or preset.request_checksum_calculation,
        response_checksum_validation=section.response_checksum_validation or preset.response_checksum_validation,
    )
    if extra is not None:
        cfg = cfg.merge(extra)
    try:
        core = botocore.session.Session(profile=section.profile or None)
        core.register_component("data_loader", _shared_loader())  # parsed service models, reused
        session = boto3.session.Session(botocore_session=core)
        return session.client("s3", endpoint_url=endpoint, config=cfg)
    except botocore.exceptions.BotoCoreError as exc:
        raise TierFailed(f"object tier: cannot create the S3 client: {exc}") from exc


def make_transfer_manager(client: Any, section: ObjectSection) -> Any:
    """boto3's transfer manager for multipart uploads: part_size_bytes parts, max_concurrency at once."""
    return create_transfer_manager(
        client,
        TransferConfig(
            multipart_threshold=section.part_size_bytes,
            multipart_chunksize=section.part_size_bytes,
            max_concurrency=section.max_concurrency,
            num_download_attempts=section.max_attempts,
            use_threads=True,
            preferred_transfer_client="classic",
        ),
    )


# -- errors -----------------------------------------------------------------------------------
class DeadlineExceeded(Exception):
    """Raised from a botocore hook when an operation's total_timeout_s has passed."""


class ShortBody(Exception):
    """A ranged GET's body ended early or broke off: botocore does not retry that, the tier does."""


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def http_status(exc: BaseException) -> int:
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return 0


def is_missing(exc: BaseException) -> bool:
    """The key does not exist (a missing bucket is a failure of the tier, not a missing key)."""
    code = error_code(exc)
    return code != "NoSuchBucket" and (code in ("NoSuchKey", "404", "NotFound") or http_status(exc) == 404)


#: Errors of the store or the transport; anything else is a bug and propagates as is.
STORE_ERRORS: Final = (
    botocore.exceptions.ClientError,
    botocore.exceptions.BotoCoreError,
    s3transfer.exceptions.RetriesExceededError,
    s3transfer.exceptions.CancelledError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    DeadlineExceeded,
    ShortBody,
    OSError,
)

#: Errors while streaming a body (after botocore returned the response, so it never retries them).
STREAM_ERRORS: Final = (
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ConnectionError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


# -- deadlines --------------------------------------------------------------------------------
class Deadlines:
    """Per-key deadlines, enforced by botocore event hooks on one client."""

    def __init__(self) -> None:
        self._by_key: dict[str, float] = {}
        self._lock = threading.Lock()

    def register(self, client: Any, *, forbid_overwrite_header: bool) -> None:
        events = client.meta.events
        events.register("before-parameter-build.s3", self._hook_attach_deadline)
        events.register("request-created.s3", self._hook_check_deadline)
        events.register("needs-retry.s3", self._hook_stop_retrying)
        if forbid_overwrite_header:
            events.register("before-sign.s3.PutObject", _hook_oss_forbid_overwrite)

    @contextlib.contextmanager
    def scope(self, keys: Sequence[str], deadline_mono_s: float) -> Iterator[None]:
        """Every request on ``keys`` made until exit stops starting after deadline_mono_s."""
        with self._lock:
            for k in keys:
                self._by_key[k] = deadline_mono_s
        try:
            yield
        finally:
            with self._lock:
                for k in keys:
                    if self._by_key.get(k) == deadline_mono_s:
                        del self._by_key[k]

    def _hook_attach_deadline(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        key = params.get("Key")
        if isinstance(key, str):
            with self._lock:
                deadline = self._by_key.get(key)
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
        raise DeadlineExceeded(f"{operation_name} not started: total_timeout_s has passed")

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
            raise DeadlineExceeded(
                f"not retrying after {caught_exception or status} (attempt {attempts}): the back-off "
                "would pass total_timeout_s"
            )


def _hook_oss_forbid_overwrite(request: Any, **_: Any) -> None:
    """OSS spells a create-only put ``x-oss-forbid-overwrite: true``."""
    if request.headers.get("If-None-Match") == "*":
        del request.headers["If-None-Match"]
        request.headers["x-oss-forbid-overwrite"] = "true"


# -- small requests ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Bucket:
    """One bucket through one client: the small requests every part of the tier makes.

    Store errors propagate raw; callers type them (``ObjectTier._failed``)."""

    client: Any
    name: str

    def url(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def head(self, key: str) -> dict[str, Any] | None:
        """HEAD key; None when it does not exist."""
        try:
            return dict(self.client.head_object(Bucket=self.name, Key=key))
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                return None
            raise

    def get_small(self, key: str, limit_bytes: int) -> bytes | None:
        """The whole object (IntegrityError above limit_bytes); None when it does not exist."""
        try:
            resp = self.client.get_object(Bucket=self.name, Key=key)
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                return None
            raise
        body = resp["Body"]
        try:
            if int(resp.get("ContentLength", 0)) > limit_bytes:
                raise IntegrityError(f"{self.url(key)}: larger than {limit_bytes} bytes")
            return bytes(body.read())
        finally:
            body.close()

    def list_keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            out.extend(str(o["Key"]) for o in page.get("Contents", ()))
        return out

    def delete_key(self, key: str) -> None:
        # One DeleteObject per key: DeleteObjects requires a body checksum header that some
        # S3-compatible stores (OSS) reject in the form botocore sends it.
        self.client.delete_object(Bucket=self.name, Key=key)
