"""The in-memory reference store and readiness board, and the client's byte budget, on their own."""

from __future__ import annotations

import asyncio

import pytest

from ckptd.core.errors import AlreadyExists, BudgetExhausted, NotFound, Timeout
from ckptd.peers.budget import ByteBudget
from ckptd.peers.placement import KEEP_STEPS, ReadinessBoard
from ckptd.peers.types import MAX_REPORT_WAIT_S, ReadyReport
from tests.peer._kit import make_header, peer_client, peer_node
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


def test_a_report_is_a_long_poll_over_real_grpc() -> None:
    """A report with wait_s is answered when the step settles (another node's report completes it,
    or fails a rank), or after wait_s with the step as it is: one call per node and step instead
    of one every 0.2 s (docs/scale.md). Bad waits are refused."""
    async def main() -> None:
        async with peer_node("coord") as coord, peer_client(max_attempts=1) as client:
            t0 = asyncio.get_running_loop().time()
            held = asyncio.create_task(client.report_ready(
                coord.target, ReadyReport("j", 1, 2, "peer", "n1", (0,), wait_s=10.0)))
            await asyncio.sleep(0.3)
            assert not held.done()  # held by the coordinator: the step is not complete
            st = await client.report_ready(coord.target, ReadyReport("j", 1, 2, "peer", "n2", (1,), wait_s=10.0))
            assert st.complete  # the completing report is answered at once
            first = await asyncio.wait_for(held, 5)
            assert first.complete and asyncio.get_running_loop().time() - t0 < 5
            t1 = asyncio.get_running_loop().time()
            st = await client.report_ready(coord.target, ReadyReport("j", 2, 2, "peer", "n1", (0,), wait_s=0.4))
            assert not st.complete and st.ready_ranks == (0,)  # answered after wait_s, not settled
            assert 0.35 <= asyncio.get_running_loop().time() - t1 < 5
            held = asyncio.create_task(client.report_ready(
                coord.target, ReadyReport("j", 3, 2, "peer", "n1", (0,), wait_s=10.0)))
            await asyncio.sleep(0.2)
            await client.report_ready(coord.target, ReadyReport("j", 3, 2, "peer", "n2", (1,), failed=True,
                                                                message="ENOSPC"))
            assert (await asyncio.wait_for(held, 5)).failed_ranks == (1,)  # a failed rank settles it too
        for bad in (-1.0, MAX_REPORT_WAIT_S + 1, float("nan")):
            with pytest.raises(ValueError, match="waits"):
                ReadyReport("j", 1, 2, "peer", "n1", (0,), wait_s=bad).validate()
    asyncio.run(main())


def test_readiness_board_keeps_a_bounded_window_of_steps() -> None:
    async def main() -> None:
        board = ReadinessBoard("coord")
        for step in range(1, 3 * KEEP_STEPS):
            await board.report(ReadyReport("j", step, 1, "peer", "n1", (0,)))
        assert board.newest_complete("j", "peer") == 3 * KEEP_STEPS - 1
        with pytest.raises(NotFound):
            board.state("j", KEEP_STEPS, "peer")  # forgotten: more than KEEP_STEPS behind the newest
        assert board.state("j", 2 * KEEP_STEPS - 1, "peer").complete
        await board.report(ReadyReport("other", 1, 1, "peer", "n1", (0,)))  # other jobs keep theirs
        assert board.newest_complete("other", "peer") == 1
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
