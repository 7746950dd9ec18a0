"""Crash scenarios: a trainer killed mid-copy; a daemon SIGKILLed at a failpoint of the stage,
drain or upload path (the seed picks the point and which hit of it); stale shm slots and temp
files left for the next daemon. Every killed daemon is restarted on what survived (the seed
picks whether its shared memory survived too) and the trainer resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from ckptd_client import Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from tests.fault.invariants import Save
from tests.fault.scenarios import scenario
from tests.fault.scenarios._ctx import Ctx
from tests.fault.scenarios._env import REPO

W = 2
# failpoint -> hits per step of a two-rank job, and whether the step is committed on disk when
# the daemon dies on the last of those hits
DRAIN_POINTS = {
    "shm.sidecar.before_write": (2 * W, False),  # "crc pending" and checksummed sidecar per shard
    "disk.shard.before_write": (W, False),
    "disk.file.before_fsync": (W + 1, False),  # the shard files, then the manifest
    "disk.file.after_fsync": (W + 1, False),
    "disk.shard.before_link": (W, False),
    "disk.shard.after_link": (W, False),
    "disk.shard.after_dir_fsync": (W, False),
    "disk.manifest.before_write": (1, False),
    "disk.manifest.before_link": (1, False),
    "disk.manifest.after_link": (1, True),
    "disk.manifest.after_dir_fsync": (1, True),
}
UPLOAD_POINTS = {
    "object.upload.before_shard": W,
    "object.upload.after_shard": W,
    "object.commit.before_manifest": 1,
}


def _wait_log(ctx: Ctx, node: object, needle: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in node.log():  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the daemon log after {timeout_s}s")
        time.sleep(0.05)


@scenario
def trainer_kill_mid_copy(ctx: Ctx) -> None:
    """A trainer rank SIGKILLed while it copies a step into its slot; the job resumes."""
    before = ctx.randint("steps_before", 1, 3)
    torn = ctx.uniform("copied_fraction", 0.05, 0.95)
    victim = ctx.choose("killed_rank", range(W))
    other = 1 - victim
    n = ctx.node().start()
    led = ctx.ledger
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fault.scenarios._trainer", n.addr, ctx.job, str(ctx.seed), str(led.nbytes),
         str(W), str(victim), str(before), str(torn)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "client")])})  # this tree's client
    try:
        for step in range(1, before + 1):
            ctx.save(step, [other])
        assert proc.stdout is not None
        for line in proc.stdout:
            word, *rest = line.split()
            if word == "SAVED":
                step, ok, secs = int(rest[0]), rest[1] == "1", float(rest[2])
                led.saves.append(Save(step, victim, 0, n.name, ok, "", secs))
            elif word == "TORN":
                break
        else:
            raise AssertionError(f"trainer exited early: {proc.stderr.read() if proc.stderr else ''}")
        ctx.save(before + 1, [other])  # the other rank staged the step the victim never finished
    finally:
        proc.kill()
        proc.wait(10)
    ctx.must_ack(before, Level.STAGED)
    ctx.fault(f"rank {victim} killed having copied {torn:.0%} of step {before + 1}")
    _wait_log(ctx, n, f"save lease of {ctx.job}@{before + 1} rank {victim} expired")
    ctx.check("after trainer kill")
    # the job restarts: every rank resumes from the newest committed step, then saves on
    for rank in range(W):
        got, served = ctx.restore(rank)
        assert got == before, f"rank {rank} resumed from step {got}, expected {before}"
    ctx.say(f"resumed from step {before} ({served})")
    ctx.save(before + 1)
    assert ctx.saved_ok(before + 1), led.saves[-2:]
    ctx.must_ack(before + 1, Level.LOCAL_DURABLE)
    ctx.check("after resume")


@scenario
def daemon_kill_mid_drain(ctx: Ctx) -> None:
    """The daemon SIGKILLed at a failpoint of staging or of the disk commit; restarted."""
    point = ctx.choose("failpoint", sorted(DRAIN_POINTS))
    per_step, commits = DRAIN_POINTS[point]
    nth = ctx.randint("hit_in_step", 1, per_step)
    before = ctx.randint("steps_before", 1, 2)
    kill_at = per_step * before + nth
    n = ctx.node(faults={"CKPTD_FAILPOINTS": f"{point}=kill@{kill_at}"}).start()
    for step in range(1, before + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    victim = before + 1
    ctx.save(victim)  # returns at STAGED; the background work then hits the failpoint
    ctx.ack(victim, Level.STAGED, timeout_s=5)
    assert n.wait_dead(30) == -9, n.log()[-2000:]
    wipe = ctx.cycle("restart", ["shm intact", "shm wiped"]) == "shm wiped"
    ctx.fault(f"killed at {point}#{nth} of step {victim}", "daemon@n1", *(["memory@n1"] if wipe else []))
    ctx.restart(n, wipe_shm=wipe)
    on_disk = (n.data_dir / ctx.job / f"step-{victim:012d}" / "manifest.json").exists()
    if wipe:  # with the shm intact the re-adopted step may be drained again by now
        assert on_disk == commits, f"step {victim}: on disk after recovery: {on_disk}, expected {commits}"
    ctx.say(f"restart ({'shm wiped' if wipe else 'shm intact'}): step {victim} "
            f"{'committed on disk' if on_disk else 'not on disk'}")
    ctx.check("after restart", recovered={"n1"})
    nxt = victim + 1
    ctx.save(nxt)
    assert ctx.saved_ok(nxt), ctx.ledger.saves[-2:]
    ctx.must_ack(nxt, Level.LOCAL_DURABLE)
    ctx.check("after resume", recovered={"n1"})


@scenario
def daemon_kill_mid_upload(ctx: Ctx) -> None:
    """The daemon SIGKILLed at a failpoint of the object upload or global commit; restarted."""
    point = ctx.choose("failpoint", sorted(UPLOAD_POINTS))
    per_step = UPLOAD_POINTS[point]
    nth = ctx.randint("hit_in_step", 1, per_step)
    before = ctx.randint("steps_before", 1, 2)
    n = ctx.node(object=ctx.env.object_config(),
                 faults={"CKPTD_FAILPOINTS": f"{point}=kill@{per_step * before + nth}"}).start()
    for step in range(1, before + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.PERSISTED, timeout_s=60)
    victim = before + 1
    ctx.save(victim)
    ctx.ack(victim, Level.LOCAL_DURABLE, timeout_s=10)
    assert n.wait_dead(60) == -9, n.log()[-2000:]
    wipe = ctx.cycle("restart", ["shm intact", "shm wiped"]) == "shm wiped"
    ctx.fault(f"killed at {point}#{nth} of step {victim}", "daemon@n1", *(["memory@n1"] if wipe else []))
    ctx.check("killed (store only)", down={"n1"})
    ctx.restart(n, wipe_shm=wipe)
    ctx.must_ack(victim, Level.PERSISTED, timeout_s=15)  # the restarted daemon uploads it again
    ctx.say(f"restart ({'shm wiped' if wipe else 'shm intact'}): step {victim} uploaded again, PERSISTED")
    ctx.check("after restart", recovered={"n1"})


STALE = ("torn slot", "sidecar temp", "stranger file", "orphan sidecar", "garbage sidecar", "disk temp dir",
         "manifest-less step")


@scenario
def stale_after_restart(ctx: Ctx) -> None:
    """Stale shm slots, sidecars and disk temp files left by a dead daemon; the next one cleans up."""
    steps = ctx.randint("steps", 2, 3)
    k = ctx.randint("kinds", 2, len(STALE))
    kinds = sorted(ctx.rng.sample(STALE, k))
    ctx.params["stale"] = kinds
    n = ctx.node().start()
    for step in range(1, steps + 1):
        ctx.save(step)
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    m = ctx.manager(0)
    if "torn slot" in kinds:  # a lease no reaper drops in time (no client pid), half-written
        begin = m.conn.stub.BeginSave(pb.BeginSaveRequest(job=ctx.job, step=steps + 1, rank=0, world_size=W,
                                                          nbytes=ctx.ledger.nbytes), timeout=30)
        with open(begin.slot_path, "r+b") as f:
            f.write(os.urandom(ctx.ledger.nbytes // 2))
    n.kill()
    shm, jd = n.shm_dir, n.data_dir / ctx.job
    slot = sorted(shm.glob("slot-*.bin"))[0]
    if "sidecar temp" in kinds:
        (shm / f"slot-{uuid.uuid4().hex}.meta.json.tmp").write_text("{")
    if "stranger file" in kinds:
        (shm / "core.1234").write_bytes(b"x" * 100)
    if "orphan sidecar" in kinds:
        metas = sorted(shm.glob("slot-*.meta.json"))
        (shm / f"slot-{uuid.uuid4().hex}.meta.json").write_bytes(metas[0].read_bytes() if metas else b"{}")
    if "garbage sidecar" in kinds:
        copy = shm / f"slot-{uuid.uuid4().hex}.bin"
        copy.write_bytes(slot.read_bytes())
        copy.with_name(copy.stem + ".meta.json").write_text(json.dumps({"job": ctx.job, "step": "x"}))
    if "disk temp dir" in kinds:
        tmp = jd / f"step-{steps:012d}" / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        (tmp / "rank-000000.shard").write_bytes(b"\0" * 4096)
    if "manifest-less step" in kinds:
        sd = jd / f"step-{steps + 7:012d}"
        sd.mkdir()
        (sd / "rank-000000.shard").write_bytes(b"\0" * 4096)
    ctx.fault("daemon killed; stale files planted: " + ", ".join(kinds), "daemon@n1")
    ctx.restart(n)
    ctx.check("after restart", recovered={"n1"})
    for step in range(steps + 1, steps + 4):  # slots are reused, not grown, after the cleanup
        ctx.save(step)
        assert ctx.saved_ok(step), ctx.ledger.saves[-2:]
        ctx.must_ack(step, Level.LOCAL_DURABLE)
    ctx.check("after resume", recovered={"n1"})
