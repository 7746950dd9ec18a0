"""Shared vocabulary of ckptd: durability levels, tier names, dtypes and name validation.

Invariants:
- Job names and keys follow an allow-list grammar: no ``..``, no ``/``, no absolute paths,
  no control characters, bounded length. Every name that reaches a file path or an object key
  passes ``validate_job`` first.
- dtypes are named by the strings in ``DTYPE_ITEMSIZE``; nothing else is accepted on the wire.
- A name or number out of its grammar raises ``InvalidValue`` (a ValueError, core/errors.py): the
  validators check requests, so their error is the caller's bad input, answered INVALID_ARGUMENT.
This module is imported by the client: it must stay free of heavy dependencies.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from ckptd.core.errors import InvalidValue


class Level(enum.IntEnum):
    """Durability levels a step climbs; numeric values match the protobuf enum."""

    STAGED = 1
    REPLICATED = 2
    LOCAL_DURABLE = 3
    PERSISTED = 4


class TierName(enum.StrEnum):
    """Storage tiers, nearest first."""

    MEMORY = "memory"
    DISK = "disk"
    PEER = "peer"
    OBJECT = "object"


#: Tier that reaching a level requires.
LEVEL_TIER: Final[dict[Level, TierName]] = {
    Level.STAGED: TierName.MEMORY,
    Level.REPLICATED: TierName.PEER,
    Level.LOCAL_DURABLE: TierName.DISK,
    Level.PERSISTED: TierName.OBJECT,
}

#: Supported element types and their size in bytes.
DTYPE_ITEMSIZE: Final[dict[str, int]] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex128": 16,
    "complex64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

MAX_NAME_LEN: Final = 128
MAX_TENSOR_NAME_LEN: Final = 1024
MAX_STEP: Final = 10**12 - 1  # fits step-{step:012d}
MAX_WORLD_SIZE: Final = 65536
MAX_NDIM: Final = 32

_JOB_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_job(job: str) -> str:
    """Return ``job`` if it is a valid job name, else raise InvalidValue saying why."""
    if not isinstance(job, str) or not job:
        raise InvalidValue("job name must be a non-empty string")
    if len(job) > MAX_NAME_LEN:
        raise InvalidValue(f"job name longer than {MAX_NAME_LEN} characters")
    if ".." in job:
        raise InvalidValue(f"job name {job!r} must not contain '..'")
    if not _JOB_RE.fullmatch(job):
        raise InvalidValue(
            f"job name {job!r} may only use letters, digits, '.', '_' and '-' and must start "
            "with a letter or digit"
        )
    return job


def validate_step(step: int) -> int:
    """Return ``step`` if 0 <= step <= MAX_STEP, else raise InvalidValue."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidValue(f"step must be an integer, got {type(step).__name__}")
    if step < 0 or step > MAX_STEP:
        raise InvalidValue(f"step {step} out of range [0, {MAX_STEP}]")
    return step


def validate_rank(rank: int, world_size: int) -> None:
    """Raise InvalidValue unless 1 <= world_size <= MAX_WORLD_SIZE and 0 <= rank < world_size."""
    if world_size < 1 or world_size > MAX_WORLD_SIZE:
        raise InvalidValue(f"world_size {world_size} out of range [1, {MAX_WORLD_SIZE}]")
    if rank < 0 or rank >= world_size:
        raise InvalidValue(f"rank {rank} outside world_size {world_size}")


def validate_node_ranks(node_ranks: list[int] | tuple[int, ...], world_size: int,
                        rank: int | None = None) -> tuple[int, ...]:
    """Normalise the ranks one node holds: sorted, unique, < world_size, containing ``rank``.

    An empty list, or one naming every rank, means a one-node job and normalises to ().
    """
    ranks = tuple(sorted({int(r) for r in node_ranks}))
    if len(ranks) != len(node_ranks):
        raise InvalidValue("node_ranks lists a rank twice")
    if ranks and not 0 <= ranks[0] <= ranks[-1] < world_size:
        raise InvalidValue(f"node_ranks must lie in [0, {world_size})")
    if ranks and rank is not None and rank not in ranks:
        raise InvalidValue(f"rank {rank} is not among node_ranks")
    return () if len(ranks) == world_size else ranks


def shard_key(rank: int) -> str:
    """File/object name of one rank's shard inside a step directory."""
    return f"rank-{rank:06d}.shard"


def step_dirname(step: int) -> str:
    """Directory/prefix name of a step."""
    return f"step-{step:012d}"


_STEP_DIR_RE: Final = re.compile(r"step-([0-9]{12})")


def parse_step_dirname(name: str) -> int | None:
    """Inverse of step_dirname; None for names that are not step directories."""
    m = _STEP_DIR_RE.fullmatch(name)
    return int(m.group(1)) if m else None


MAX_TRANSFER_CHUNK_BYTES: Final = 4 * 2**20  # the largest chunk of one peer transfer
NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_node_id(node_id: str, what: str = "node id") -> str:
    """Return node_id if it follows the allow-list grammar, else raise InvalidValue."""
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id) or ".." in node_id:
        raise InvalidValue(f"{what} {node_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
                         "starting with a letter or digit (no '..')")
    return node_id

INCARNATION_RE: Final = re.compile(r"[A-Za-z0-9_-]{0,64}")


def validate_incarnation(token: str) -> str:
    """Return a writer incarnation token ("" means unknown) if it is 0-64 letters, digits, '_' or '-'."""
    if not isinstance(token, str) or not INCARNATION_RE.fullmatch(token):
        raise InvalidValue(f"incarnation {token[:80]!r} must be 0-64 letters, digits, '_' or '-'")
    return token

SLOT_ALIGN_BYTES: Final = 2 * 2**20  # shm slots are sized in multiples of this: the smallest slot
