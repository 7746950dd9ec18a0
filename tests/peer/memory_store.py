"""In-memory reference implementation of PeerServer's replica store, for tests and benches (the
model the daemon's slot-backed store follows; the product's store is ckptd/peers/replicas.py).

``MemoryReplicaStore`` is a ReplicaSink, a ShardSource and a holdings function over bytearrays,
under a byte budget. Invariants: a replica becomes visible (``shards``, ``holdings``,
``open_shard``) only in ``commit``, after the server verified it; at most one receive per
(job, step, rank) runs at a time; an identical replica is not received twice (``begin_replica``
returns None); the budget counts held and in-flight bytes, and an incoming replica that does not
fit waits up to ``wait_timeout_s`` for room, then fails with BudgetExhausted. Buffers of dropped
replicas are recycled for the next one of the same size (like the daemon's slot reuse).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from ckptd.core.errors import AlreadyExists, BudgetExhausted, NotFound
from ckptd.core.manifest import ReplicaHeader
from ckptd.peers.types import Holding, OpenShard

Key = tuple[str, int, int]


@dataclass
class StoredShard:
    header: ReplicaHeader
    data: bytearray
    replica: bool  # False: this node's own shard (add_local)
    pins: int = 0


class _MemoryWriter:
    def __init__(self, store: MemoryReplicaStore, header: ReplicaHeader, data: bytearray) -> None:
        self._store = store
        self._header = header
        self._data = data
        self._done = False

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._data)

    @property
    def file(self) -> Path | None:
        return None  # process memory: written through the buffer

    async def commit(self) -> tuple[str, ...]:
        self._finish()
        self._store.shards[self._header.key] = StoredShard(self._header, self._data, replica=True)
        return ("memory",)

    async def abort(self, reason: str) -> None:
        if self._done:
            return
        self._finish()
        self._store.aborted.append((self._header.key, reason))
        self._store._recycle(self._data)

    def _finish(self) -> None:
        self._done = True
        self._store._receiving.pop(self._header.key, None)
        self._store.reserved_bytes -= self._header.nbytes
        self._store._notify()


class MemoryReplicaStore:
    """Replicas and own shards in bytearrays; see the module invariants."""

    def __init__(self, node_id: str, budget_bytes: int | None = None, wait_timeout_s: float = 0.0) -> None:
        self.node_id = node_id
        self.budget_bytes = budget_bytes
        self.wait_timeout_s = wait_timeout_s
        self.shards: dict[Key, StoredShard] = {}
        self.complete_steps: set[tuple[str, int]] = set()
        self.aborted: list[tuple[Key, str]] = []  # (key, reason) of every rejected receive
        self.reserved_bytes = 0
        self._receiving: dict[Key, ReplicaHeader] = {}
        self._free: list[bytearray] = []
        self._changed = asyncio.Event()

    @property
    def used_bytes(self) -> int:
        return sum(len(s.data) for s in self.shards.values()) + self.reserved_bytes

    def _notify(self) -> None:
        self._changed.set()

    def _recycle(self, data: bytearray) -> None:
        if self.budget_bytes is None or len(data) <= self.budget_bytes:
            self._free = [b for b in self._free if len(b) != len(data)] + [data]

    def _buffer(self, nbytes: int) -> bytearray:
        for i, b in enumerate(self._free):
            if len(b) == nbytes:
                return self._free.pop(i)
        return bytearray(nbytes)

    # -- ReplicaSink ------------------------------------------------------------------------------
    async def begin_replica(self, header: ReplicaHeader) -> _MemoryWriter | None:
        key = header.key
        held = self.shards.get(key)
        if held is not None:
            if held.header.same_bytes(header):
                return None
            raise AlreadyExists(f"{header.job}@{header.step} rank {header.rank} is held with other bytes")
        if key in self._receiving:
            raise AlreadyExists(f"{header.job}@{header.step} rank {header.rank} is being received already")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout_s
        while self.budget_bytes is not None and self.used_bytes + header.nbytes > self.budget_bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BudgetExhausted(f"node {self.node_id}: no room for a {header.nbytes}-byte replica "
                                      f"({self.used_bytes} of {self.budget_bytes} bytes in use)")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        self._receiving[key] = header
        self.reserved_bytes += header.nbytes
        return _MemoryWriter(self, header, self._buffer(header.nbytes))

    # -- own shards, queries, eviction ------------------------------------------------------------
    def add_local(self, header: ReplicaHeader, data: bytes | bytearray | memoryview) -> None:
        """Hold one of this node's own shards (servable by FetchShard)."""
        self.shards[header.key] = StoredShard(header, bytearray(data), replica=False)

    def get(self, job: str, step: int, rank: int) -> bytes | None:
        s = self.shards.get((job, step, rank))
        return None if s is None else bytes(s.data)

    def drop(self, job: str, step: int, rank: int) -> None:
        s = self.shards.pop((job, step, rank), None)
        if s is not None and s.pins == 0:
            self._recycle(s.data)
        self._notify()

    def mark_complete(self, job: str, step: int) -> None:
        self.complete_steps.add((job, step))

    # -- ShardSource ------------------------------------------------------------------------------
    async def open_shard(self, job: str, step: int, rank: int) -> OpenShard:
        s = self.shards.get((job, step, rank))
        if s is None:
            raise NotFound(f"node {self.node_id} holds no copy of {job}@{step} rank {rank}")
        s.pins += 1
        view = memoryview(s.data)
        released = False

        async def read(offset: int, nbytes: int) -> memoryview:
            return view[offset : offset + nbytes]

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                s.pins -= 1
                view.release()

        return OpenShard(s.header, "memory", read, release, view)

    async def holdings(self, job: str = "") -> list[Holding]:
        return [
            Holding(h.job, h.step, h.rank, h.world_size, h.nbytes, ("memory",),
                    (h.job, h.step) in self.complete_steps, h.source_node)
            for (j, _, _), s in sorted(self.shards.items()) if not job or j == job
            for h in (s.header,)
        ]
