"""Vocabulary of peer replication: what travels between daemons and what a PeerServer depends on.

``PeerServer`` (peer_server.py) never sees the Daemon. It is given four narrow dependencies:

- a ``ReplicaSink`` that hands out a writable buffer for an incoming replica (``begin_replica``),
  and later either keeps it (``commit``) or drops it (``abort``). The server verifies every byte
  (transfer-chunk crc32c, total size, the shard's integrity-chunk crc32c list) before it calls
  ``commit``; a replica that fails any check is aborted and was never visible;
- a ``ShardSource`` that opens a shard this node holds (own or replica, memory or disk) for
  ``FetchShard``; the opened shard is pinned until ``release`` is awaited;
- a ``HoldingsFn`` listing what this node can serve;
- a ``ReadyFn`` run on a step's coordinator when a node reports its shards ready at a tier.

tests/peer/memory_store.py has an in-memory reference implementation (tests and benches); the daemon wires its
slot pool, catalog and disk tier behind the same protocols (ckptd/peers/replicas.py).

Invariants: a ``ReplicaHeader`` is internally consistent (``validate``): its ``entry`` is the
shard of ``rank``, the chunk crc32c list covers ``nbytes``, ids follow ckptd's name grammar.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from ckptd.core.layout import chunk_count
from ckptd.core.manifest import ShardEntry
from ckptd.core.types import validate_job, validate_node_ranks, validate_rank, validate_step

#: Names of the tiers a peer reports; ``peer`` is only used in readiness reports.
PEER_TIERS: Final = ("memory", "disk")
READY_TIERS: Final = ("memory", "peer", "disk", "object")
MAX_TRANSFER_CHUNK_BYTES: Final = 4 * 2**20
NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_node_id(node_id: str, what: str = "node id") -> str:
    """Return node_id if it follows the allow-list grammar, else raise ValueError."""
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id) or ".." in node_id:
        raise ValueError(f"{what} {node_id!r} must be 1-128 letters, digits, '.', '_' or '-' "
                         "starting with a letter or digit (no '..')")
    return node_id


@dataclass(frozen=True)
class ReplicaHeader:
    """Identity and layout of one shard, enough for the receiver to keep and restore it."""

    job: str
    step: int
    world_size: int
    entry: ShardEntry
    source_node: str
    node_ranks: tuple[int, ...] = ()
    created_unix_s: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.entry.rank

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.job, self.step, self.entry.rank)

    def validate(self) -> ReplicaHeader:
        """Raise ValueError naming the first inconsistency; return self."""
        validate_job(self.job)
        validate_step(self.step)
        validate_rank(self.entry.rank, self.world_size)
        validate_node_ranks(self.node_ranks, self.world_size, self.entry.rank)
        validate_node_id(self.source_node, "source node")
        e = self.entry
        if e.nbytes < 0 or e.chunk_bytes <= 0 or len(e.chunk_crc32c) != chunk_count(e.nbytes, e.chunk_bytes):
            raise ValueError(f"shard {e.rank}: chunk_crc32c does not cover {e.nbytes} bytes "
                             f"in chunks of {e.chunk_bytes}")
        return self

    def same_bytes(self, other: ReplicaHeader) -> bool:
        """Do both headers describe the same shard bytes (same size and checksums)?"""
        a, b = self.entry, other.entry
        return (self.key, a.nbytes, a.chunk_bytes, a.chunk_crc32c) == (
            other.key, b.nbytes, b.chunk_bytes, b.chunk_crc32c)


@dataclass(frozen=True)
class PushResult:
    """One replica pushed: the peer that holds it now and where (PeerClient.push)."""

    node_id: str
    nbytes: int
    seconds: float
    already_held: bool
    tiers: tuple[str, ...]


@dataclass(frozen=True)
class FetchResult:
    """One shard fetched from a peer (PeerClient.fetch_into): its header and the serving tier."""

    header: ReplicaHeader
    tier: str
    seconds: float


@dataclass(frozen=True)
class Holding:
    """One shard a node can serve with FetchShard."""

    job: str
    step: int
    rank: int
    world_size: int
    nbytes: int
    tiers: tuple[str, ...]
    step_complete: bool
    source_node: str


@dataclass(frozen=True)
class ReadyReport:
    """A node's shards of (job, step) reached (or will never reach) a tier."""

    job: str
    step: int
    world_size: int
    tier: str
    node_id: str
    ranks: tuple[int, ...]
    failed: bool = False
    message: str = ""

    def validate(self) -> ReadyReport:
        validate_job(self.job)
        validate_step(self.step)
        validate_node_id(self.node_id)
        if self.tier not in READY_TIERS:
            raise ValueError(f"tier {self.tier!r} is not one of {', '.join(READY_TIERS)}")
        if not self.ranks:
            raise ValueError("a readiness report must name at least one rank")
        for r in self.ranks:
            validate_rank(r, self.world_size)
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError("a readiness report lists a rank twice")
        return self


@dataclass(frozen=True)
class ReadyState:
    """What a coordinator knows about (job, step) at one tier."""

    job: str
    step: int
    tier: str
    world_size: int
    ready_ranks: tuple[int, ...]
    failed_ranks: tuple[int, ...]
    coordinator_node: str
    ready_nodes: tuple[str, ...] = ()  # the nodes whose reports made ready_ranks ready

    @property
    def complete(self) -> bool:
        return len(self.ready_ranks) == self.world_size


@dataclass(frozen=True)
class PingInfo:
    node_id: str
    failure_domain: str
    version: str
    unix_time_s: float
    rtt_s: float = 0.0


@dataclass(frozen=True)
class FileBacked:
    """A destination buffer that maps ``path`` from offset 0 and has not been written through yet
    (a slot just created): a bulk receive writes the file (pwrite) rather than the mapping."""

    view: memoryview
    path: Path


class ReplicaWriter(Protocol):
    """Destination of one incoming replica: a writable buffer of exactly ``nbytes``."""

    @property
    def buffer(self) -> memoryview: ...

    @property
    def file(self) -> Path | None:
        """The file ``buffer`` maps from offset 0 when a bulk receive should write through it
        (``FileBacked``: a slot just created), else None."""
        ...

    async def commit(self) -> tuple[str, ...]:
        """Keep the fully verified replica; return the tiers now holding it ("memory", "disk")."""
        ...

    async def abort(self, reason: str) -> None:
        """Drop the buffer; the replica never existed. Must be safe to await once after a cancel."""
        ...


class ReplicaSink(Protocol):
    async def begin_replica(self, header: ReplicaHeader) -> ReplicaWriter | None:
        """Reserve room for a replica (may wait; raise BudgetExhausted when none comes).

        Return None when an identical replica (``same_bytes``) is already held. Raise
        AlreadyExists when the same shard with different bytes is held or being received.
        """
        ...


@dataclass
class OpenShard:
    """A shard opened for FetchShard: pinned until ``release`` is awaited."""

    header: ReplicaHeader
    tier: str  # "memory" or "disk"
    read: Callable[[int, int], Awaitable[memoryview | bytes]]  # (offset, nbytes) -> those bytes
    release: Callable[[], Awaitable[None]]
    view: memoryview | None = None  # all nbytes, when memory-resident (bulk sends straight from it)


class ShardSource(Protocol):
    async def open_shard(self, job: str, step: int, rank: int) -> OpenShard:
        """Open a held shard (raise NotFound when this node has no copy)."""
        ...


HoldingsFn = Callable[[str], Awaitable[list[Holding]]]  # job filter ("" = all) -> holdings
ReadyFn = Callable[[ReadyReport], Awaitable[ReadyState]]
