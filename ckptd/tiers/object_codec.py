"""Per-chunk codecs of the object tier: zstandard over byte planes, and the choice of codec.

Job: turn one chunk of a shard into the bytes stored for it, and back, and choose per chunk
whether compressing pays on this node's CPU and link.

Invariants:
- ``encode`` never changes what ``decode_into`` gives back: the chunk's exact bytes. Checksums
  (crc32c in the manifest, sha256 in the chunk record) are over these uncompressed bytes; the
  caller verifies them after ``decode_into``, on every read.
- Floating-point chunks (bf16/fp16: 2-byte, fp32: 4-byte elements) are compressed as byte planes
  (every element's byte 0, then every byte 1, ...): exponents and signs group together and
  compress; a trailing partial element stays in place. The codec name says which (``CODECS``).
- A chunk is stored ``raw`` when it is small or compression does not pay (``MAX_STORED_RATIO``).
- ``decode_into`` bounds its output to the chunk's size: a hostile or damaged object cannot make
  it allocate more, and a wrong size is an IntegrityError.
- ``CodecChooser`` is thread-safe. Per chunk it picks the option (the configured level, level 1,
  raw) with the least estimated time per byte, from moving averages of what it measured: the
  compression speed and ratio of each level, and the PUT speed per request. When the CPU, not
  the link, is the limit, compressing costs more than it saves and the choice falls to level 1,
  then raw; every ``PROBE_EVERY`` chunks it tries another option so the estimates follow changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

import numpy as np
import zstandard

from ckptd.core.errors import IntegrityError
from ckptd.core.layout import TensorEntry

MIN_COMPRESS_BYTES: Final = 64 * 1024  # smaller chunks are stored raw: not worth a codec
MAX_STORED_RATIO: Final = 0.97  # stored raw unless compression saves at least 3%
PLANE_WIDTHS: Final[dict[str, int]] = {"bfloat16": 2, "float16": 2, "float32": 4}
PROBE_EVERY: Final = 16
EWMA_WEIGHT: Final = 0.25
RAW: Final = 0  # the "level" of storing raw in CodecChooser

_tls = threading.local()


def plane_width(tensors: tuple[TensorEntry, ...], start: int) -> int:
    """Element width of the floating-point tensor holding byte ``start`` of the shard (1: none)."""
    for t in tensors:
        if t.offset <= start < t.offset + t.nbytes:
            return PLANE_WIDTHS.get(t.dtype, 1)
    return 1


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _tls.__dict__.setdefault("compressors", {})
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "decompressor", None)
    if d is None:
        d = _tls.decompressor = zstandard.ZstdDecompressor()
    return d


def shuffle(data: memoryview, width: int) -> bytes:
    """The byte planes of data's whole ``width``-byte elements, then its trailing bytes."""
    arr = np.frombuffer(data, dtype=np.uint8)
    whole = arr.size // width * width
    planes = arr[:whole].reshape(-1, width).T.tobytes()
    return planes + arr[whole:].tobytes()


def unshuffle_into(planes: bytes, width: int, dst: memoryview) -> None:
    out = np.frombuffer(dst, dtype=np.uint8)
    src = np.frombuffer(planes, dtype=np.uint8)
    whole = out.size // width * width
    out[:whole].reshape(-1, width)[:] = src[:whole].reshape(width, -1).T
    out[whole:] = src[whole:]


def encode(data: memoryview, width: int, level: int) -> tuple[str, bytes | memoryview]:
    """(codec, stored bytes) of one chunk at a zstd level; raw when level is RAW or it does not pay."""
    n = data.nbytes
    if level == RAW or n < MIN_COMPRESS_BYTES:
        return "raw", data
    src: bytes | memoryview = shuffle(data, width) if width > 1 else data
    packed = _compressor(level).compress(src)
    if len(packed) > n * MAX_STORED_RATIO:
        return "raw", data
    return ("zstd" if width == 1 else f"zstd-shuf{width}"), packed


def decode_into(codec: str, stored: bytes, dst: memoryview, where: str) -> None:
    """Fill dst (exactly the chunk) from its stored bytes; IntegrityError when they do not decode
    to exactly len(dst) bytes. The caller checks the checksums afterwards."""
    n = dst.nbytes
    if codec == "raw":
        if len(stored) != n:
            raise IntegrityError(f"{where}: {len(stored)} bytes stored for a raw chunk of {n}")
        dst[:] = stored
        return
    try:
        out = _decompressor().decompress(stored, max_output_size=n)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{where}: does not decompress ({codec}): {exc}") from None
    if len(out) != n:
        raise IntegrityError(f"{where}: decompresses to {len(out)} bytes, not the chunk's {n}")
    width = {"zstd": 1, "zstd-shuf2": 2, "zstd-shuf4": 4}.get(codec)
    if width is None:
        raise IntegrityError(f"{where}: unknown codec {codec!r}")
    if width == 1:
        dst[:] = out
    else:
        unshuffle_into(out, width, dst)


@dataclass
class _Estimate:
    seconds_per_byte: float = 0.0  # compression time per input byte (0: raw)
    ratio: float = 1.0  # stored / raw
    seen: int = 0


class CodecChooser:
    """Chooses each chunk's zstd level (or raw) from measured compression and link speeds.

    ``mode``: "auto" (measure and choose), "on" (always the configured level), "off" (raw).
    """

    def __init__(self, level: int, mode: str = "auto") -> None:
        self.level = level
        self.mode = mode
        self.options = [level] + ([1] if level > 1 else []) + [RAW]
        self._est = {o: _Estimate() for o in self.options}
        self._est[RAW].seen = 1  # raw costs no CPU and stores the bytes as they are
        self._put_s_per_byte = 0.0  # per request, on the stored bytes
        self._puts = 0
        self._count = 0
        self._lock = threading.Lock()

    def choose(self) -> int:
        if self.mode != "auto":
            return self.level if self.mode == "on" else RAW
        with self._lock:
            self._count += 1
            unseen = [o for o in self.options if self._est[o].seen == 0]
            if unseen or self._puts == 0:
                return unseen[0] if unseen else self.options[0]
            best = min(self.options, key=self._cost)
            if self._count % PROBE_EVERY == 0:  # keep the others' estimates fresh
                others = [o for o in self.options if o != best]
                return others[(self._count // PROBE_EVERY) % len(others)]
            return best

    def _cost(self, option: int) -> float:
        """Estimated seconds per raw byte: compressing it, then putting what is stored."""
        e = self._est[option]
        return e.seconds_per_byte + e.ratio * self._put_s_per_byte

    def observe_encode(self, level: int, raw_bytes: int, stored_bytes: int, seconds: float) -> None:
        if level == RAW or raw_bytes < MIN_COMPRESS_BYTES:
            return
        with self._lock:
            e = self._est[level] if level in self._est else self._est.setdefault(level, _Estimate())
            spb, ratio = seconds / raw_bytes, stored_bytes / raw_bytes
            w = 1.0 if e.seen == 0 else EWMA_WEIGHT
            e.seconds_per_byte += w * (spb - e.seconds_per_byte)
            e.ratio += w * (ratio - e.ratio)
            e.seen += 1

    def observe_put(self, stored_bytes: int, seconds: float) -> None:
        if stored_bytes < MIN_COMPRESS_BYTES:
            return
        with self._lock:
            spb = seconds / stored_bytes
            w = 1.0 if self._puts == 0 else EWMA_WEIGHT
            self._put_s_per_byte += w * (spb - self._put_s_per_byte)
            self._puts += 1

    def snapshot(self) -> dict[str, float]:
        """The current estimates (for logs and the bench)."""
        with self._lock:
            out = {"put_s_per_mib": self._put_s_per_byte * 2**20}
            for o, e in self._est.items():
                name = "raw" if o == RAW else f"zstd{o}"
                out[f"{name}_s_per_mib"] = e.seconds_per_byte * 2**20
                out[f"{name}_ratio"] = e.ratio
            return out
