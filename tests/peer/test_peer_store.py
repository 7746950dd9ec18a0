"""The in-memory reference store and readiness board, and the client's byte budget, on their own."""

from __future__ import annotations

import asyncio

import pytest

from ckptd.core.errors import AlreadyExists, BudgetExhausted, NotFound, Timeout
from ckptd.peers.client import ByteBudget
from ckptd.peers.placement import ReadinessBoard
from ckptd.peers.types import ReadyReport
from tests.peer._kit import make_header
from tests.peer.memory_store import MemoryReplicaStore


def test_store_commit_abort_budget_wait_and_recycling() -> None:
    async def main() -> None:
        store = MemoryReplicaStore("n", budget_bytes=2000, wait_timeout_s=2.0)
        h1, h2 = make_header(b"a" * 1000, step=1), make_header(b"b" * 1000, step=2)
        w1 = await store.begin_replica(h1)
        assert w1 is not None
        with pytest.raises(AlreadyExists, match="being received"):
            await store.begin_replica(h1)
        w1.buffer[:] = b"a" * 1000
        assert await w1.commit() == ("memory",)
        assert await store.begin_replica(h1) is None  # identical: nothing to receive
        w2 = await store.begin_replica(h2)
        assert w2 is not None and store.used_bytes == 2000
        # a third replica waits for room; dropping step 1 makes it and recycles its buffer
        h3 = make_header(b"c" * 1000, step=3)
        waiting = asyncio.create_task(store.begin_replica(h3))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        recycled = store.shards[h1.key].data
        store.drop("job", 1, 0)
        w3 = await waiting
        assert w3 is not None and w3.buffer.obj is recycled
        await w2.abort("test")
        assert store.aborted == [(h2.key, "test")] and h2.key not in store.shards
        await w3.abort("again")
        await w3.abort("twice is harmless")
        assert store.reserved_bytes == 0
        store.wait_timeout_s = 0.0
        store.add_local(make_header(b"x" * 1500, step=9), b"x" * 1500)
        with pytest.raises(BudgetExhausted):
            await store.begin_replica(make_header(b"d" * 1000, step=4))
        opened = await store.open_shard("job", 9, 0)
        assert opened.view is not None and bytes(await opened.read(10, 5)) == b"xxxxx"
        await opened.release()
        await opened.release()
        with pytest.raises(NotFound):
            await store.open_shard("job", 99, 0)
    asyncio.run(main())


def test_readiness_board() -> None:
    async def main() -> None:
        board = ReadinessBoard("coord")
        with pytest.raises(NotFound):
            board.state("j", 1, "disk")
        with pytest.raises(ValueError):
            await board.report(ReadyReport("j", 1, 2, "tape", "n", (0,)))
        with pytest.raises(ValueError):
            await board.report(ReadyReport("j", 1, 2, "disk", "n", (2,)))
        with pytest.raises(ValueError):
            await board.report(ReadyReport("j", 1, 2, "disk", "n", ()))
        await board.report(ReadyReport("j", 1, 2, "disk", "n1", (0,), failed=True, message="ENOSPC"))
        st = await board.report(ReadyReport("j", 1, 2, "disk", "n2", (0, 1)))  # a replacement node
        assert st.complete and st.failed_ranks == ()
        with pytest.raises(Timeout):
            await board.wait_complete("j", 2, "disk", 0.05)
        assert board.newest_complete("j", "disk") == 1 and board.newest_complete("j", "peer") is None
        board.forget("j", 1)
        assert board.newest_complete("j", "disk") is None
    asyncio.run(main())


def test_byte_budget_bounds_concurrent_holders() -> None:
    async def main() -> None:
        budget = ByteBudget(10)
        assert await budget.acquire(6) == 6
        second = asyncio.create_task(budget.acquire(6))
        await asyncio.sleep(0.02)
        assert not second.done() and budget.in_use_bytes == 6
        await budget.release(6)
        assert await second == 6
        big = asyncio.create_task(budget.acquire(100))  # oversized: passes alone, as the whole budget
        await asyncio.sleep(0.02)
        assert not big.done()
        await budget.release(6)
        assert await big == 10 and budget.in_use_bytes == 10
    asyncio.run(main())
