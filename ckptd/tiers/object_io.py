"""The object tier's data path: uploads from a buffer, parallel ranged GETs into one, checksums.

Job: move shard bytes between the caller's memory and the store with bounded copies and
bounded time, and never hand back bytes that were not verified.

Invariants:
- An upload reads the caller's memoryview through ``MemoryReader``, a seekable file that
  s3transfer reads one part at a time (one bounded copy per part, never a copy of the whole
  buffer) and seeks back to retry a part.
- ``read_ranges_into`` splits a shard into ranged GETs of whole chunks (``range_bytes``), run on
  the tier's pool; each range is pinned to the ETag seen first (``If-Match``), so an object
  replaced mid-read is an IntegrityError, never a mix of two versions. Every chunk a range
  covers is checked against the crc32c recorded in the manifest (computed at staging), never
  trusting the server. A body that ends early or breaks off is retried up to ``max_attempts``
  within the deadline; the first failure stops the other ranges at their next block.
- ``map_all`` waits for every call it started before it returns or raises: no worker writes
  into the caller's buffer after a read returned.
- ``abort_stale_uploads`` aborts only multipart uploads initiated before the cut-off (by the
  store's clock), so another daemon's live upload to the same prefix is left alone.
"""

from __future__ import annotations

import http.client
import io
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import botocore.exceptions

from ckptd.core.errors import IntegrityError, NotFound
from ckptd.core.integrity import crc32c
from ckptd.core.layout import chunk_count
from ckptd.core.logs import ProgressLog
from ckptd.core.manifest import ShardEntry
from ckptd.tiers.object_client import (
    STREAM_ERRORS,
    Bucket,
    DeadlineExceeded,
    ShortBody,
    error_code,
    http_status,
    is_missing,
)

READ_BLOCK_BYTES: Final = 4 * 2**20  # one readinto per block while streaming a range
log = logging.getLogger("ckptd.object")

T = TypeVar("T")
A = TypeVar("A")


class MemoryReader(io.RawIOBase):
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


def byte_view(buf: memoryview) -> memoryview:
    """buf as a flat view of bytes."""
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def map_all(
    pool: ThreadPoolExecutor, fn: Callable[[A], T], items: Iterable[A], *,
    prefer: type[BaseException] | None = None,
) -> list[T]:
    """fn over items on pool; waits for every call, then raises the first error (the first
    of type ``prefer`` when there is one) or returns the results in order."""
    futures: list[Future[T]] = [pool.submit(fn, item) for item in items]
    results: list[T] = []
    errors: list[BaseException] = []
    for fut in futures:
        try:
            results.append(fut.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below once all are done
            errors.append(exc)
    if errors:
        preferred = [e for e in errors if prefer is not None and isinstance(e, prefer)]
        raise (preferred or errors)[0]
    return results


def range_bytes(chunk_bytes: int, part_size_bytes: int) -> int:
    """Size of one ranged GET: a whole number of chunks, about part_size_bytes."""
    if chunk_bytes >= part_size_bytes:
        return chunk_bytes
    return part_size_bytes // chunk_bytes * chunk_bytes


def read_whole_into(
    store: Bucket, pool: ThreadPoolExecutor, key: str, view: memoryview, entry: ShardEntry, step_bytes: int,
    deadline: float, max_attempts: int, chunks: Sequence[int] = (),
) -> None:
    """Fill view[:entry.nbytes] from a shard stored as one object (HEAD for its size and ETag, then
    ``read_ranges_into``). Raises IntegrityError, NotFound, or a store error (typed by the caller)."""
    url, n = store.url(key), entry.nbytes
    if len(entry.chunk_crc32c) != chunk_count(n, entry.chunk_bytes):
        raise IntegrityError(f"{url}: {len(entry.chunk_crc32c)} chunk checksums do not cover {n} bytes")
    head = store.head(key)
    if head is None:
        raise NotFound(f"{url} is missing")
    size = int(head["ContentLength"])
    if size != n:
        raise IntegrityError(f"{url}: size {size} != {n} recorded in the manifest (truncated or replaced)")
    read_ranges_into(store, pool, key, str(head.get("ETag", "")), view, entry, step_bytes, deadline, max_attempts,
                     chunks)


def read_ranges_into(
    store: Bucket, pool: ThreadPoolExecutor, key: str, etag: str, view: memoryview, entry: ShardEntry,
    step_bytes: int, deadline: float, max_attempts: int, chunks: Sequence[int] = (),
) -> None:
    """Fill view[:entry.nbytes] from parallel ranged GETs of step_bytes and verify every chunk;
    with ``chunks`` (a ranged restore) only those crc32c chunks, one GET each.

    Raises IntegrityError, NotFound, or a store error (typed by the caller)."""
    n, cb = entry.nbytes, entry.chunk_bytes
    stop = threading.Event()
    spans = [(i * cb, min(i * cb + cb, n)) for i in chunks] if chunks else \
        [(start, min(start + step_bytes, n)) for start in range(0, n, step_bytes)]

    def fetch(span: tuple[int, int]) -> None:
        try:
            _fetch_range(store, key, etag, view, span[0], span[1], entry, deadline, stop, max_attempts)
        except BaseException:
            stop.set()  # the others stop at their next block
            raise

    map_all(pool, fetch, spans, prefer=IntegrityError)


def _fetch_range(
    store: Bucket, key: str, etag: str, view: memoryview, start: int, end: int, entry: ShardEntry,
    deadline: float, stop: threading.Event, max_attempts: int,
) -> None:
    """Fill view[start:end] from one ranged GET (retried on body-stream errors), then check
    the chunks it covers."""
    url = store.url(key)
    attempt = 0
    while True:
        attempt += 1
        if stop.is_set():
            return
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"range {start}-{end}")
        try:
            _get_range_into(store, key, etag, view, start, end, deadline, stop)
            break
        except botocore.exceptions.ClientError as exc:
            if http_status(exc) == 412 or error_code(exc) == "PreconditionFailed":
                raise IntegrityError(f"{url}: object replaced while it was read") from None
            if is_missing(exc):
                raise NotFound(f"{url} disappeared while it was read") from None
            raise
        except ShortBody as exc:
            if attempt >= max_attempts:
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
    store: Bucket, key: str, etag: str, view: memoryview, start: int, end: int, deadline: float,
    stop: threading.Event,
) -> None:
    want = end - start
    if want == 0:
        return
    extra = {"IfMatch": etag} if etag else {}
    resp = store.client.get_object(Bucket=store.name, Key=key, Range=f"bytes={start}-{end - 1}", **extra)
    body = resp["Body"]
    done = False
    try:
        if int(resp.get("ContentLength", -1)) != want:
            raise ShortBody(f"range {start}-{end}: server sent {resp.get('ContentLength')} bytes")
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
                raise DeadlineExceeded(f"range {start}-{end} at {got} bytes")
            try:
                k = readinto(view[start + got : start + min(want, got + READ_BLOCK_BYTES)])
            except STREAM_ERRORS as exc:
                raise ShortBody(f"range {start}-{end}: body broke off at {got} of {want} bytes: {exc}") from exc
            if not k:
                raise ShortBody(f"range {start}-{end}: body ended at {got} of {want} bytes")
            got += k
        done = True
    finally:
        if done and raw is not None and hasattr(raw, "release_conn"):
            raw.release_conn()  # fully read: the connection goes back to the pool
        else:
            body.close()


def abort_stale_uploads(store: Bucket, prefix: str, older_than_s: float) -> list[tuple[str, str]]:
    """Abort the multipart uploads under prefix initiated more than older_than_s ago (0: all);
    the (key, upload_id) pairs aborted. Store errors propagate raw."""
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
    aborted: list[tuple[str, str]] = []
    for page in store.client.get_paginator("list_multipart_uploads").paginate(Bucket=store.name, Prefix=prefix):
        for up in page.get("Uploads", ()):
            initiated = up.get("Initiated")
            if older_than_s > 0 and isinstance(initiated, datetime) and initiated > cutoff:
                continue
            try:
                store.client.abort_multipart_upload(Bucket=store.name, Key=up["Key"], UploadId=up["UploadId"])
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) != "NoSuchUpload":
                    raise
            aborted.append((str(up["Key"]), str(up["UploadId"])))
    return aborted
