"""Concurrency scenarios: a restore while a save of a later step is in flight (one rank still
copying, between the ranks' saves, or staged and draining), a reader that is not the trainer
restoring an older step meanwhile, and two writers racing for the same (step, rank) with
different bytes. The in-flight save must still commit; the restore must return
a committed step, whole; exactly one racing writer wins, and its bytes are served, never a mix."""

from __future__ import annotations

import mmap
import os
import threading
import time

from ckptd_client import AlreadyExists, CheckpointManager, Level, SaveHandle
from ckptd_client.tree import copy_into, flatten

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.layout import layout_to_pb
from tests.fault.scenarios import scenario
from tests.fault.scenarios._ctx import Ctx
from tests.fault.scenarios._env import WAIT_TIMEOUT_S
from tests.state_factory import blank_like

W = 2


class _SlowCopy:
    """Rank ``rank``'s save of ``step`` done by hand, so a test can act in the middle of the copy."""

    def __init__(self, ctx: Ctx, step: int, rank: int) -> None:
        self.ctx, self.step, self.rank = ctx, step, rank
        self.m = ctx.manager(rank)
        leaves, self.tensors, self.tree_json, self.nbytes = flatten(ctx.ledger.state(step, rank))
        self.full = bytearray(self.nbytes)
        copy_into(self.full, leaves, self.tensors)
        t0 = time.perf_counter()
        self.begin = self.m.conn.call(self.m.conn.stub.BeginSave, pb.BeginSaveRequest(
            job=ctx.job, step=step, rank=rank, world_size=W, nbytes=self.nbytes, client_pid=os.getpid()))
        fd = os.open(self.begin.slot_path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, self.begin.slot_capacity_bytes)
        finally:
            os.close(fd)
        self.cut = int(self.nbytes * ctx.uniform("copied_before_restore", 0.05, 0.95))
        self.mm[: self.cut] = self.full[: self.cut]
        self.seconds = time.perf_counter() - t0

    def finish(self) -> None:
        t0 = time.perf_counter()
        self.mm[self.cut : self.nbytes] = self.full[self.cut :]
        self.m.conn.call(self.m.conn.stub.CommitShard, pb.CommitShardRequest(
            lease_id=self.begin.lease_id, job=self.ctx.job, step=self.step, rank=self.rank, world_size=W,
            nbytes=self.nbytes, layout=layout_to_pb(self.tensors, self.tree_json), chunk_bytes=self.begin.chunk_bytes))
        self.mm.close()
        self.ctx.record(self.step, self.rank, 0, self.ctx.home(self.rank), None,
                        self.seconds + time.perf_counter() - t0)


@scenario
def restore_during_save(ctx: Ctx) -> None:
    """A restore while a save of a later step is in flight; both complete, neither is mixed."""
    before = ctx.randint("steps_before", 1, 2)
    when = ctx.cycle("restore_while", ["a rank is copying", "between the ranks' saves", "staged, draining"])
    restorer = ctx.choose("restoring_rank", range(W))
    asks = ctx.choose("asks_for", ["latest", "the previous step"])
    ctx.node().start()
    for step in range(1, before + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    later = before + 1
    expect = before
    if when == "a rank is copying":
        ctx.save(later, [0])
        copying = _SlowCopy(ctx, later, 1)
        got, served = ctx.restore(restorer, "latest" if asks == "latest" else before)
        copying.finish()
    elif when == "between the ranks' saves":
        ctx.save(later, [0])
        got, served = ctx.restore(restorer, "latest" if asks == "latest" else before)
        ctx.save(later, [1])
    else:
        ctx.save(later)
        ctx.must_ack(later, Level.STAGED)
        expect = later if asks == "latest" else before
        got, served = ctx.restore(restorer, "latest" if asks == "latest" else before)
    ctx.fault(f"rank {restorer} restored {asks} while step {later} was in flight ({when})")
    assert got == expect, f"restore of {asks} returned step {got}, expected {expect}"
    err = ctx.ack(later, Level.LOCAL_DURABLE, timeout_s=6)
    ctx.say(f"restore returned step {got} from {served}; step {later}: "
            + ("LOCAL_DURABLE" if not err else f"never completed ({err[:120]})"))
    ctx.check("after the restore")


@scenario
def reader_during_save(ctx: Ctx) -> None:
    """A reader (an operator's restore, an evaluation process: not the trainer) restores an older
    step of a rank while a later step is in flight; the acknowledged later step must still commit."""
    before = ctx.randint("steps_before", 1, 3)
    when = ctx.cycle("read_while", ["between the ranks' saves", "staged, draining"])
    rank = ctx.choose("read_rank", range(W))
    old = ctx.randint("read_step", 1, before)
    n = ctx.node().start()
    for step in range(1, before + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    later = before + 1
    first = [rank] if when == "between the ranks' saves" else list(range(W))
    ctx.save(later, first)
    with CheckpointManager(ctx.job, rank=rank, world_size=W, addr=n.addr) as reader:
        got = reader.restore(blank_like(ctx.ledger.state(old, rank)), step=old)
    assert got == old, f"the reader asked for step {old}, got {got}"
    ctx.fault(f"a reader restored step {old} of rank {rank} while step {later} was in flight ({when})")
    if when == "between the ranks' saves":
        ctx.save(later, [r for r in range(W) if r != rank])
    err = ctx.ack(later, Level.LOCAL_DURABLE, timeout_s=6)
    assert not err, f"step {later} never committed after a read of step {old}: {err[:160]}"
    ctx.check("after the read")


@scenario
def two_writers(ctx: Ctx) -> None:
    """Two writers race for one (step, rank) with different bytes; exactly one wins, whole."""
    steps = ctx.randint("steps", 2, 3)
    racer = ctx.choose("racing_rank", range(W))
    n = ctx.node().start()
    winners = []
    for step in range(1, steps + 1):
        delays = [ctx.rng.uniform(0, 0.004) for _ in range(2)]
        managers = [ctx.manager(racer), CheckpointManager(ctx.job, rank=racer, world_size=W, addr=n.addr,
                                                          wait_timeout_s=WAIT_TIMEOUT_S)]
        handles: list[SaveHandle | None] = [None, None]
        times = [0.0, 0.0]
        go = threading.Barrier(2)

        def write(i: int, step: int = step, delays: list[float] = delays, managers: list[CheckpointManager] = managers,
                  handles: list[SaveHandle | None] = handles, times: list[float] = times, go: threading.Barrier = go
                  ) -> None:
            state = ctx.ledger.state(step, racer, variant=i)
            go.wait(10)
            time.sleep(delays[i])
            t0 = time.perf_counter()
            handles[i] = managers[i].save(step, state)
            times[i] = time.perf_counter() - t0

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        managers[1].close()
        for i, h in enumerate(handles):
            assert h is not None, "a racing save never returned"
            ctx.record(step, racer, i, n, h, times[i])
        oks = [i for i, h in enumerate(handles) if h is not None and h.ok]
        assert len(oks) == 1, f"step {step}: {len(oks)} writers won: {[h.error for h in handles if h]}"
        loser = handles[1 - oks[0]]
        assert loser is not None and isinstance(loser.error, AlreadyExists), f"loser's error: {loser and loser.error}"
        winners.append(oks[0])
        ctx.save(step, [1 - racer])
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    ctx.fault(f"rank {racer} raced by two writers at every step; winners (writer index) {winners}")
    ctx.check("after the races")
