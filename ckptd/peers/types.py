"""Vocabulary of peer replication: what travels between daemons and what a PeerServer depends on.

``PeerServer`` (peer_server.py) never sees the Daemon. It is given four narrow dependencies:

- a ``ReplicaSink`` that hands out a writable buffer for an incoming replica (``begin_replica``),
  and later either keeps it (``commit``) or drops it (``abort``). The server verifies every byte
  (transfer-chunk crc32c, total size, the shard's integrity-chunk crc32c list) before it calls
  ``commit``; a replica that fails any check is aborted and was never visible;
- a ``ShardSource`` that opens a shard this node holds (own or replica, memory or disk) for
  ``FetchShard``; the opened shard is held until ``release`` is awaited;
- a ``HoldingsFn`` listing what this node can serve;
- a ``ReadyFn`` run on a step's coordinator when a node reports its shards ready at a tier.

tests/peer/memory_store.py has an in-memory reference implementation (tests and benches); the daemon wires its
slot pool, catalog and disk tier behind the same protocols (ckptd/peers/replicas.py).

The ``ReplicaHeader`` that names a replicated shard is vocabulary shared with the catalog, so it
lives in ckptd/core/manifest.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from ckptd.core.errors import InvalidValue
from ckptd.core.manifest import ReplicaHeader
from ckptd.core.types import validate_job, validate_node_id, validate_rank, validate_step

#: Names of the tiers a peer reports; ``peer`` is only used in readiness reports.
PEER_TIERS: Final = ("memory", "disk")
READY_TIERS: Final = ("memory", "peer", "disk", "object")
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


MAX_REPORT_WAIT_S = 30.0  # the longest a coordinator holds a report before answering


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
    wait_s: float = 0.0  # the coordinator answers when the step settles or after this long (a long poll)

    def validate(self) -> ReadyReport:
        validate_job(self.job)
        validate_step(self.step)
        validate_node_id(self.node_id)
        if self.tier not in READY_TIERS:
            raise InvalidValue(f"tier {self.tier!r} is not one of {', '.join(READY_TIERS)}")
        if not self.ranks:
            raise InvalidValue("a readiness report must name at least one rank")
        for r in self.ranks:
            validate_rank(r, self.world_size)
        if len(set(self.ranks)) != len(self.ranks):
            raise InvalidValue("a readiness report lists a rank twice")
        if not 0.0 <= self.wait_s <= MAX_REPORT_WAIT_S:  # NaN fails too
            raise InvalidValue(f"a readiness report waits 0 to {MAX_REPORT_WAIT_S:g} s, not {self.wait_s}")
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
    """A shard opened for FetchShard: held until ``release`` is awaited."""

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
