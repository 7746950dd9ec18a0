"""Disk-tier faults: ENOSPC (a size-capped tmpfs under the disk tier, or the enospc failpoint
where mounting is not allowed), EIO on write and on fsync (failpoints, the seed picks the hit),
EIO on read (a bad shard file, through tests/fault/scenarios/_faultwrap.py). A failed disk write
degrades the level and is reported; the memory copy keeps serving; a later step is written
afresh; a shard that cannot be read is reported, never served."""

from __future__ import annotations

import os

import grpc
from ckptd_client import Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from tests.fault.scenarios import Skip, scenario
from tests.fault.scenarios._ctx import Ctx
from tests.fault.scenarios._env import Node

KiB = 1024
W = 2
ENOSPC_TEXT = "No space left on device"
EIO_TEXT = "Input/output error"
EROFS_TEXT = "Read-only file system"


def disk_state(node: Node, job: str, step: int) -> int:
    with grpc.insecure_channel(f"unix:{node.addr}") as ch:
        st = pb_grpc.CheckpointServiceStub(ch).GetStepStatus(pb.GetStepStatusRequest(job=job, step=step), timeout=10)
    return next(t.state for t in st.tiers if t.tier == "disk")


@scenario
def disk_enospc(ctx: Ctx) -> None:
    """The disk tier fills up; saves go on at STAGED, the level degrades, then space is freed."""
    fits = ctx.randint("steps_that_fit", 1, 2)
    slack = ctx.randint("slack_kib", 16, 150)
    n = ctx.node()
    step_bytes = W * ctx.ledger.nbytes + 16 * KiB
    why = ctx.env.mount_tmpfs(n.data_dir, fits * step_bytes + slack * KiB)
    if why:  # no mount here: the failpoint stands in for the full disk
        ctx.notes.append(f"size-capped tmpfs not available ({why}); using the disk.shard.before_write "
                         "enospc failpoint instead")
        n.faults = {"CKPTD_FAILPOINTS": f"disk.shard.before_write=enospc@{fits * W + 1}"}
    else:
        ctx.mounts.append(n.data_dir)
    ctx.params["full_by"] = "failpoint" if why else "tmpfs"
    n.start()
    for step in range(1, fits + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    failed = []
    for step in range(fits + 1, fits + 3):
        ctx.save(step)
        ctx.must_ack(step, Level.STAGED)
        err = ctx.ack(step, Level.LOCAL_DURABLE)
        if err:
            assert ENOSPC_TEXT in err, f"step {step}: unclear disk failure: {err}"
            assert disk_state(n, ctx.job, step) == 4, "a failed drain not reported FAILED"
            failed.append(step)
    assert failed and failed[0] == fits + 1, f"the disk never filled up (failed steps {failed})"
    ctx.fault(f"disk full from step {fits + 1}: steps {failed} FAILED at the disk tier ({ENOSPC_TEXT})")
    ctx.check("disk full")
    if not why:
        ctx.env.resize_tmpfs(n.data_dir, 64 * 2**20)
        ctx.say("space freed (tmpfs grown)")
    nxt = fits + 3
    ctx.save(nxt)
    ctx.must_ack(nxt, Level.LOCAL_DURABLE)
    ctx.say(f"step {nxt} LOCAL_DURABLE again")
    ctx.check("space freed")


def _eio(ctx: Ctx, points: dict[str, int]) -> None:
    point = ctx.choose("failpoint", sorted(points))
    nth = ctx.randint("hit_in_step", 1, points[point])
    before = ctx.randint("steps_before", 0, 2)
    n = ctx.node(faults={"CKPTD_FAILPOINTS": f"{point}=eio@{points[point] * before + nth}"}).start()
    for step in range(1, before + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    victim = before + 1
    ctx.save(victim)
    ctx.must_ack(victim, Level.STAGED)
    err = ctx.ack(victim, Level.LOCAL_DURABLE)
    assert EIO_TEXT in err, f"step {victim}: expected an EIO failure of the disk tier, got {err!r}"
    ctx.fault(f"EIO at {point}#{nth} of step {victim}: disk tier FAILED, reported")
    ctx.check("after EIO")
    ctx.save(victim + 1)
    ctx.must_ack(victim + 1, Level.LOCAL_DURABLE)
    assert disk_state(n, ctx.job, victim) == 4, "a failed fsync/write was retried (must be rewritten, never retried)"
    ctx.say(f"step {victim + 1} LOCAL_DURABLE; step {victim} stays FAILED on disk")
    ctx.check("next step")


@scenario
def disk_eio_write(ctx: Ctx) -> None:
    """EIO writing a shard or the manifest; the step stays STAGED, the next one reaches the disk."""
    _eio(ctx, {"disk.shard.before_write": W, "disk.manifest.before_write": 1})


@scenario
def disk_eio_fsync(ctx: Ctx) -> None:
    """EIO from fsync of a shard or the manifest; never retried, the next step is written afresh."""
    _eio(ctx, {"disk.file.before_fsync": W + 1})


@scenario
def disk_eio_read(ctx: Ctx) -> None:
    """EIO reading a shard file back; the restore falls to memory or reports, never serves it."""
    steps = ctx.randint("steps", 2, 3)
    n = ctx.node().start()
    for step in range(1, steps + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    bad_step = ctx.choose("bad_step", range(1, steps + 1))
    bad_rank = ctx.choose("bad_rank", range(W))
    wipe = ctx.cycle("restart", ["shm wiped", "shm intact"]) == "shm wiped"
    bad = f"step-{bad_step:012d}/rank-{bad_rank:06d}.shard"
    in_memory = ctx.in_memory(bad_step) and not wipe  # its slot may have been reused already
    ctx.restart(n, wipe_shm=wipe, wrapper=True, faults={"CKPTD_TEST_EIO_READ": bad})
    ctx.fault(f"restart ({'shm wiped' if wipe else 'shm intact'}); every read of {bad} fails with EIO",
              "daemon@n1", *(["memory@n1"] if wipe else []))
    gone = set() if in_memory else {(bad_step, bad_rank)}
    served = {(bad_step, bad_rank): "memory"} if in_memory else {}
    ctx.check("bad sector", unrecoverable=gone, served=served, recovered={"n1"})
    if not in_memory:
        m = ctx.manager(bad_rank)
        try:
            ctx.restore(bad_rank, bad_step)
        except Exception as exc:  # noqa: BLE001 - the message is the assertion
            assert EIO_TEXT in str(exc), f"the failed restore does not say why: {exc}"
            ctx.say(f"restore of {bad_step}/{bad_rank} reported: {type(exc).__name__} ({EIO_TEXT})")
        else:
            raise AssertionError(f"restore of {bad_step}/{bad_rank} succeeded from {m.last_restore}")
    ctx.save(steps + 1)
    ctx.must_ack(steps + 1, Level.LOCAL_DURABLE)
    # its memory copy may be gone by now (slots reused): then the bad disk copy is all there is
    ctx.check("next step", unrecoverable=gone, degraded={(bad_step, bad_rank)}, recovered={"n1"})


@scenario
def disk_readonly(ctx: Ctx) -> None:
    """The disk tier's filesystem turns read-only: every drain fails (reported), saves go on at
    STAGED, a restart on the read-only disk still serves; once writable, the disk catches up."""
    n = ctx.node()
    why = ctx.env.mount_tmpfs(n.data_dir, 64 * 2**20)
    if why:
        raise Skip(f"a read-only disk needs a tmpfs mount here, and mounting failed: {why}")
    ctx.mounts.append(n.data_dir)
    before = ctx.randint("steps_before", 1, 2)
    left = ctx.cycle("left_behind", ["a partial step", "nothing"])
    if left == "a partial step":  # the daemon dies with one shard of the next step published
        n.faults = {"CKPTD_FAILPOINTS": f"disk.shard.after_link=kill@{W * before + 1}"}
    n.start()
    for step in range(1, before + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    ro = before + 1
    if left == "a partial step":
        ctx.save(ro)
        assert n.wait_dead(30) == -9, n.log()[-2000:]
        ctx.env.remount(n.data_dir, "ro")
        ctx.restart(n)  # recovery cannot remove the partial step on a read-only disk; it must still serve
        ctx.fault(f"killed with step {ro} half published; the disk turned read-only; restarted on it", "daemon@n1")
        claimed = [line.split("recovery removed uncommitted ", 1)[1].split('"')[0]
                   for line in n.log().splitlines() if "recovery removed uncommitted " in line]
        still = [p for p in claimed if os.path.exists(p)]
        if still:
            ctx.flag("restart on the read-only disk", "leaks",
                     f"recovery logged as removed what is still there: {still}")
    else:
        ctx.env.remount(n.data_dir, "ro")
        ctx.save(ro)
        ctx.fault(f"the disk turned read-only before step {ro}")
    err = ctx.ack(ro, Level.LOCAL_DURABLE)
    assert EROFS_TEXT in err, f"step {ro} on a read-only disk: expected a reported EROFS failure, got {err!r}"
    ctx.save(ro + 1)
    assert EROFS_TEXT in ctx.ack(ro + 1, Level.LOCAL_DURABLE), "a later step reached a read-only disk"
    ctx.check("read-only disk", disk_writable=False)
    ctx.env.remount(n.data_dir, "rw")
    ctx.restart(n)
    ctx.fault("the disk is writable again; daemon restarted", "daemon@n1")
    ctx.save(ro + 2)
    ctx.must_ack(ro + 2, Level.LOCAL_DURABLE)
    ctx.say(f"steps {ro}-{ro + 1} FAILED on disk ({EROFS_TEXT}), step {ro + 2} LOCAL_DURABLE once writable")
    ctx.check("writable again", recovered={"n1"})
