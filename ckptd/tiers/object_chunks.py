"""The object tier's chunked data path: one object per chunk, compressed, deduplicated by content.

Job: store one shard as its chunks (``ChunkRef`` per chunk in the manifest) and read it back,
with bounded memory, bounded requests in flight and a bounded upload rate.

Invariants:
- A chunk whose sha256 and size match a chunk already stored for the job (the newest committed
  step's, or an earlier one of this upload) is not uploaded: its record references that object.
  Only keys this tier's layout accepts for the job are ever referenced.
- Every other chunk is encoded (``object_codec``; the level or raw chosen per chunk by the
  tier's ``CodecChooser``) and written with one PUT to its own key; at most ``window`` chunks
  are in flight (read, encoded, uploading), each on the tier's pool.
- ``RateLimiter`` spaces the PUT bodies of a tier so their bytes average at most its rate
  (``object.max_upload_mbit``); the pool's size caps concurrent requests (``max_concurrency``).
- A read GETs each chunk object on the pool, checks its size against the record, decodes it
  into the caller's buffer and verifies the chunk's crc32c over the decoded bytes before the
  read returns; the first failure stops the others at their next chunk; nothing is written into
  ``dst`` after ``fetch_chunks_into`` returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

import botocore.exceptions

from ckptd.core import failpoints
from ckptd.core.errors import IntegrityError, NotFound
from ckptd.core.integrity import crc32c
from ckptd.core.layout import chunk_count
from ckptd.core.manifest import ChunkRef, Manifest, ShardEntry
from ckptd.tiers.object_client import STREAM_ERRORS, Bucket, DeadlineExceeded, ShortBody, is_missing
from ckptd.tiers.object_codec import CodecChooser, decode_into, encode, plane_width
from ckptd.tiers.object_io import MemoryReader, map_all

MAX_CHUNK_ATTEMPTS: Final = 3  # a GET whose body breaks off is retried (botocore retries the request)

#: (sha256, raw size) -> where that content is stored
Known = dict[tuple[str, int], ChunkRef]


class RateLimiter:
    """Spaces requests so that their bytes average at most ``rate_bytes_per_s`` (0: unlimited)."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self._next_free = 0.0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> float:
        """Wait for nbytes' share of the rate; the seconds waited."""
        if self.rate_bytes_per_s <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + nbytes / self.rate_bytes_per_s
        wait = start - now
        if wait > 0:
            time.sleep(wait)
        return wait


@dataclass
class UploadStats:
    """What uploads of one tier did, summed (logs, ``ckptctl``-free diagnostics, the bench)."""

    raw_bytes: int = 0  # the chunks' uncompressed bytes
    stored_bytes: int = 0  # bytes PUT
    deduplicated_bytes: int = 0  # raw bytes of chunks referenced instead of uploaded
    compress_cpu_s: float = 0.0  # thread CPU seconds in encode
    throttled_s: float = 0.0  # seconds PUTs waited for the rate limit
    codecs: dict[str, int] = field(default_factory=dict)  # chunks stored per codec
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, raw: int, stored: int, dedup: int, cpu_s: float, throttled_s: float, codec: str) -> None:
        with self._lock:
            self.raw_bytes += raw
            self.stored_bytes += stored
            self.deduplicated_bytes += dedup
            self.compress_cpu_s += cpu_s
            self.throttled_s += throttled_s
            self.codecs[codec] = self.codecs.get(codec, 0) + 1

    def as_dict(self) -> dict[str, object]:
        with self._lock:
            return {"raw_bytes": self.raw_bytes, "stored_bytes": self.stored_bytes,
                    "deduplicated_bytes": self.deduplicated_bytes, "compress_cpu_s": round(self.compress_cpu_s, 4),
                    "throttled_s": round(self.throttled_s, 4), "codecs": dict(self.codecs)}


class ChunkBook:
    """A tier's memory of chunks: what each job's newest committed step stored (the dedup index,
    read once per step) and the records of shards uploaded but not committed yet."""

    def __init__(self) -> None:
        self._base: dict[str, tuple[int | None, Known]] = {}  # job -> (newest committed step, its chunks)
        self._known: dict[str, tuple[int | None, int, Known]] = {}  # job -> (newest, uploading step, chunks)
        self._staged: dict[tuple[str, int, int], tuple[int, tuple[ChunkRef, ...]]] = {}
        self._lock = threading.Lock()

    def known(self, job: str, step: int, newest: int | None, read: Callable[[int], Manifest]) -> Known:
        """The chunks an upload of job@step may reference: those of job's committed step ``newest``
        (None: no step; its manifest read once), by (sha256, size), plus what uploads of this same
        step stored (shared by them; never another step's uncommitted chunks). A manifest that
        cannot be read gives none."""
        with self._lock:
            cached = self._known.get(job)
            if cached is not None and cached[:2] == (newest, step):
                return cached[2]
            base = self._base.get(job)
        if base is None or base[0] != newest:
            chunks: Known = {}
            if newest is not None:
                with contextlib.suppress(NotFound, IntegrityError):
                    for s in read(newest).shards:
                        for i, ref in enumerate(s.chunks):
                            chunks.setdefault((ref.sha256, min(s.chunk_bytes, s.nbytes - i * s.chunk_bytes)), ref)
            base = (newest, chunks)
        with self._lock:
            self._base[job] = base
            known = self._known.setdefault(job, (newest, step, dict(base[1])))
            if known[:2] != (newest, step):
                known = self._known[job] = (newest, step, dict(base[1]))
            return known[2]

    def forget(self, job: str) -> None:
        with self._lock:
            self._known.pop(job, None)
            self._base.pop(job, None)

    def stage(self, job: str, step: int, rank: int, nbytes: int, refs: tuple[ChunkRef, ...]) -> None:
        with self._lock:
            for k in [k for k in self._staged if k[0] == job and k[1] < step]:
                del self._staged[k]  # a newer step of the job uploads: those were recorded or abandoned
            self._staged[(job, step, rank)] = (nbytes, refs)

    def staged(self, job: str, step: int, rank: int) -> tuple[int, tuple[ChunkRef, ...]] | None:
        with self._lock:
            return self._staged.get((job, step, rank))


@dataclass
class ChunkUploader:
    """Everything an upload of chunks needs from its tier."""

    store: Bucket
    pool: ThreadPoolExecutor
    chooser: CodecChooser
    limiter: RateLimiter
    stats: UploadStats
    window: int


def upload_chunks(up: ChunkUploader, entry: ShardEntry, view: memoryview, key_of: Callable[[int], str],
                  known: Known) -> tuple[ChunkRef, ...]:
    """Store view's chunks (deduplicated against and added to ``known``); their records in order."""
    cb, n = entry.chunk_bytes, entry.nbytes
    lock = threading.Lock()

    def one(i: int) -> ChunkRef:
        off = i * cb
        data = view[off : min(off + cb, n)]
        digest = hashlib.sha256(data).hexdigest()
        with lock:
            ref = known.get((digest, data.nbytes))
        if ref is not None:
            up.stats.add(data.nbytes, 0, data.nbytes, 0.0, 0.0, "dedup")
            return ref
        level = up.chooser.choose()
        cpu0, t0 = time.thread_time(), time.perf_counter()
        codec, body = encode(data, plane_width(entry.tensors, off), level)
        up.chooser.observe_encode(level, data.nbytes, len(body), time.perf_counter() - t0)
        cpu_s = time.thread_time() - cpu0
        key = key_of(i)
        throttled_s = up.limiter.acquire(len(body))
        t0 = time.perf_counter()
        payload = MemoryReader(body) if isinstance(body, memoryview) else body
        up.store.client.put_object(Bucket=up.store.name, Key=key, Body=payload,
                                   ContentType="application/octet-stream")
        up.chooser.observe_put(len(body), time.perf_counter() - t0)
        failpoints.hit("object.upload.chunk")
        up.stats.add(data.nbytes, len(body), 0, cpu_s, throttled_s, codec)
        ref = ChunkRef(key, codec, len(body), digest)
        with lock:
            known.setdefault((digest, data.nbytes), ref)
        return ref

    refs: list[ChunkRef] = []
    inflight: deque[Future[ChunkRef]] = deque()
    try:
        for i in range(chunk_count(n, cb)):
            if len(inflight) >= up.window:
                refs.append(inflight.popleft().result())
            inflight.append(up.pool.submit(one, i))
        while inflight:
            refs.append(inflight.popleft().result())
    finally:
        for fut in inflight:  # an error: let the others finish before the caller's view goes
            fut.cancel()
        for fut in inflight:
            if not fut.cancelled():
                try:
                    fut.result()
                except BaseException:  # noqa: BLE001, S110 - the first error is already raised
                    pass
    return tuple(refs)


def fetch_chunks_into(store: Bucket, pool: ThreadPoolExecutor, entry: ShardEntry, view: memoryview,
                      deadline: float, only: Sequence[int] = ()) -> None:
    """Fill view[:entry.nbytes] from entry's chunk objects, decoded and crc32c-verified; with
    ``only`` (a ranged restore's crc32c chunk indexes) just those chunks."""
    cb, n = entry.chunk_bytes, entry.nbytes
    stop = threading.Event()

    def one(i: int) -> None:
        if stop.is_set():
            return
        try:
            ref = entry.chunks[i]
            off = i * cb
            dst = view[off : min(off + cb, n)]
            url = store.url(ref.object_key)
            data = _get_chunk(store, ref, deadline)
            decode_into(ref.codec, data, dst, url)
            if crc32c(dst) != entry.chunk_crc32c[i]:
                raise IntegrityError(f"{url}: crc32c mismatch in chunk {i} (offset {off}) after decoding")
        except BaseException:
            stop.set()
            raise

    map_all(pool, one, list(only) if only else range(len(entry.chunks)), prefer=IntegrityError)


def _get_chunk(store: Bucket, ref: ChunkRef, deadline: float) -> bytes:
    url = store.url(ref.object_key)
    for attempt in range(1, MAX_CHUNK_ATTEMPTS + 1):
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{url}: not read")
        try:
            resp = store.client.get_object(Bucket=store.name, Key=ref.object_key)
        except botocore.exceptions.ClientError as exc:
            if is_missing(exc):
                raise NotFound(f"{url} is missing") from None
            raise
        body = resp["Body"]
        try:
            size = int(resp.get("ContentLength", -1))
            if size != ref.stored_bytes:
                raise IntegrityError(f"{url}: size {size} != {ref.stored_bytes} recorded in the manifest")
            data = bytes(body.read())
        except STREAM_ERRORS as exc:
            if attempt == MAX_CHUNK_ATTEMPTS:
                raise ShortBody(f"{url}: body broke off: {exc}") from exc
            continue
        finally:
            body.close()
        if len(data) != ref.stored_bytes:
            if attempt == MAX_CHUNK_ATTEMPTS:
                raise ShortBody(f"{url}: body ended at {len(data)} of {ref.stored_bytes} bytes")
            continue
        return data
    raise AssertionError("unreachable")
