"""The [object] config section: the S3-compatible object tier's settings and their checks.

Registered in the package (``__init__.py``) like every other section (``"object": ObjectSection`` in
``_SECTIONS`` and an ``object`` field on ``Config``), so the TOML file and ``CKPTD_OBJECT_<KEY>``
variables set it with the usual precedence; ``validate_object`` also checks a section built by hand
(ckptctl's bucket commands, the tier itself).

Invariants (``validate_object``): every value is in its documented range or set, and an error
names its key; the bucket (and for preset ``oss`` a region or endpoint) is required only when the
tier is enabled. Credentials never appear here (the standard AWS chain or a named ``profile``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ckptd.core.errors import InvalidArgument

OBJECT_PRESETS: Final = ("aws", "minio", "oss")
MIN_PART_SIZE_BYTES: Final = 5 * 2**20  # S3's minimum multipart part size (except the last part)
MAX_PART_SIZE_BYTES: Final = 5 * 2**30


@dataclass(frozen=True)
class ObjectSection:
    """[object]: the S3-compatible object tier (ckptd/tiers/object.py). Empty strings mean
    "the preset's default"; credentials never appear here (standard AWS chain or ``profile``)."""

    enabled: bool = False
    preset: str = "aws"  # aws | minio (path-style) | oss (virtual-hosted, checksums when required)
    endpoint_url: str = ""  # default: AWS's; oss: https://oss-{region}.aliyuncs.com
    region: str = ""
    bucket: str = ""
    prefix: str = ""  # key prefix inside the bucket, e.g. "ckpt/cluster-a"
    profile: str = ""  # named profile of the AWS config files; empty: the default chain
    addressing_style: str = ""  # auto | virtual | path; empty: the preset's
    request_checksum_calculation: str = ""  # when_supported | when_required; empty: the preset's
    response_checksum_validation: str = ""  # when_supported | when_required; empty: the preset's
    part_size_bytes: int = 16 * 2**20  # multipart part size and ranged-GET size
    max_concurrency: int = 8  # parallel part uploads / ranged GETs per tier
    max_attempts: int = 5  # attempts per request, the first included
    retry_mode: str = "standard"  # standard | adaptive
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    total_timeout_s: float = 900.0  # bound on one put_shard / read_shard_into / commit
    hashed_prefixes: int = 0  # spread shard objects over N hashed prefixes (0: next to the manifest)
    conditional_put: str = "auto"  # auto (probe) | on | off (claim-object fallback)
    max_to_keep: int = 3
    keep_period: int = 0  # also keep every step divisible by this (0: off)
    every_n_steps: int = 1
    commit_wait_s: float = 600.0  # how long a step's coordinator waits for other nodes' shards
    compression: str = "auto"  # auto (per chunk, by measured CPU and link speed) | on | off (raw)
    compression_level: int = 1  # zstd level when compressing (1 measured best for bf16/fp32 states)
    dedup: bool = True  # chunks already stored for the job (same sha256) are referenced, not uploaded
    max_upload_mbit: float = 0.0  # cap on this node's upload rate to the store, Mbit/s (0: none)


_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def validate_object(o: ObjectSection) -> None:
    """Checks of [object]; raise InvalidArgument naming the key. Bucket/endpoint only when enabled."""
    choices = (("preset", o.preset, OBJECT_PRESETS),
               ("addressing_style", o.addressing_style, ("", "auto", "virtual", "path")),
               ("request_checksum_calculation", o.request_checksum_calculation,
                ("", "when_supported", "when_required")),
               ("response_checksum_validation", o.response_checksum_validation,
                ("", "when_supported", "when_required")),
               ("retry_mode", o.retry_mode, ("standard", "adaptive")),
               ("conditional_put", o.conditional_put, ("auto", "on", "off")))
    for key, val, allowed in choices:
        if val not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a)
            raise InvalidArgument(f"object.{key} must be one of {shown}, got {val!r}")
    if not MIN_PART_SIZE_BYTES <= o.part_size_bytes <= MAX_PART_SIZE_BYTES:
        raise InvalidArgument(f"object.part_size_bytes must be in [5MiB, 5GiB], got {o.part_size_bytes}")
    if not 1 <= o.max_concurrency <= 256:
        raise InvalidArgument(f"object.max_concurrency must be in [1, 256], got {o.max_concurrency}")
    if not 1 <= o.max_attempts <= 20:
        raise InvalidArgument(f"object.max_attempts must be in [1, 20], got {o.max_attempts}")
    for key, secs in (("connect_timeout_s", o.connect_timeout_s), ("read_timeout_s", o.read_timeout_s),
                      ("total_timeout_s", o.total_timeout_s), ("commit_wait_s", o.commit_wait_s)):
        if not 0 < secs <= 86400:
            raise InvalidArgument(f"object.{key} must be in (0, 86400], got {secs}")
    if o.compression not in ("auto", "on", "off"):
        raise InvalidArgument(f"object.compression must be one of 'auto', 'on', 'off', got {o.compression!r}")
    if isinstance(o.compression_level, bool) or not 1 <= o.compression_level <= 19:
        raise InvalidArgument(f"object.compression_level must be in [1, 19], got {o.compression_level}")
    if not 0 <= o.max_upload_mbit <= 1e6:
        raise InvalidArgument(f"object.max_upload_mbit must be in [0, 1000000] (0: no cap), got {o.max_upload_mbit}")
    if not 0 <= o.hashed_prefixes <= 65536:
        raise InvalidArgument(f"object.hashed_prefixes must be in [0, 65536], got {o.hashed_prefixes}")
    if o.max_to_keep < 1 or o.keep_period < 0 or o.every_n_steps < 1:
        raise InvalidArgument("object.max_to_keep and object.every_n_steps must be >= 1, object.keep_period >= 0")
    if o.prefix and (".." in o.prefix or not _PREFIX_RE.fullmatch(o.prefix.strip("/"))):
        raise InvalidArgument(
            f"object.prefix {o.prefix!r} must be '/'-separated names of letters, digits, '.', '_', '-' "
            "(no '..', no empty parts)"
        )
    if o.endpoint_url and not re.fullmatch(r"https?://[^/\s]+/?", o.endpoint_url):
        raise InvalidArgument(f"object.endpoint_url must be http(s)://host[:port], got {o.endpoint_url!r}")
    if o.enabled:
        if not o.bucket:
            raise InvalidArgument("object.bucket is required when object.enabled is true")
        if not _BUCKET_RE.fullmatch(o.bucket) or ".." in o.bucket:
            raise InvalidArgument(f"object.bucket {o.bucket!r} is not a valid bucket name")
        if o.preset == "oss" and not (o.endpoint_url or o.region):
            raise InvalidArgument("object.region (e.g. cn-hangzhou) or object.endpoint_url is required "
                                  "for preset 'oss'")


__all__ = ["MAX_PART_SIZE_BYTES", "MIN_PART_SIZE_BYTES", "OBJECT_PRESETS", "ObjectSection", "validate_object"]
