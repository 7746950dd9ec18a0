"""Daemon crashes: SIGKILL at every point of the disk commit, restarts on what survived
(DESIGN.md sections 3, 6, 9; issue 2 items 5 and 7 and the Acceptance list).

A killed daemon is restarted on the same root and shm directory (a "node" coming back). The
invariants: no partial step is ever reported committed, the previous step stays restorable bit
for bit, recovery leaves no temp or manifest-less step directories, and a restore names the tier
that served it (disk after the shm was wiped, memory from re-adopted slots whose crc verified).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import grpc
import pytest

from ckptd.core.types import Level
from tests.fault.faultkit import (
    JOB,
    Raw,
    committed_steps_everywhere,
    disk_leftovers,
    failpoint_hits,
    flip_byte,
    job_dir,
    manager,
    restore_checked,
    rpc_code,
    sidecars,
    slot_of,
    step_dir,
    verify_disk_step,
    wait_dead,
)
from tests.state_factory import MiB, fault_state

NBYTES = 1 * MiB
W = 2  # ranks per step: a partial step has a real meaning


def save_step(managers, step: int):
    handles = [m.save(step, fault_state(step, m.rank, NBYTES)) for m in managers]
    return handles


def open_ranks(addr, **kw):
    return [manager(addr, rank=r, world_size=W, **kw) for r in range(W)]


def close_all(managers) -> None:
    for m in managers:
        m.close()


def restore_all(managers, step: int, served_from: str) -> None:
    for m in managers:
        restore_checked(m, step, fault_state(step, m.rank, NBYTES), served_from)


def snapshot(path: Path, dest: Path) -> Path:
    shutil.copytree(path, dest, symlinks=True)
    return dest


# (failpoint, which hit of it within step 2, hits per step, does step 2 commit on disk)
DISK_POINTS = [
    ("disk.shard.before_write", 1, W, False),
    ("disk.file.before_fsync", 1, W + 1, False),  # first shard file of step 2
    ("disk.shard.before_link", 1, W, False),
    ("disk.shard.after_link", 1, W, False),
    ("disk.shard.after_dir_fsync", W, W, False),  # every shard published, no manifest yet
    ("disk.manifest.before_write", 1, 1, False),
    ("disk.file.before_fsync", W + 1, W + 1, False),  # the manifest file of step 2
    ("disk.manifest.before_link", 1, 1, False),
    ("disk.manifest.after_link", 1, 1, True),
    ("disk.manifest.after_dir_fsync", 1, 1, True),
]


@pytest.mark.parametrize(
    "point,nth,per_step,commits", DISK_POINTS,
    ids=[f"{p}#{n}" for p, n, _, _ in DISK_POINTS],
)
def test_sigkill_during_disk_commit(daemon_factory, tmp_path, point, nth, per_step, commits):
    fp_log = tmp_path / "failpoints.log"
    kill_at = per_step + nth  # step 1 passes the point per_step times; step 2 dies on hit nth
    d = daemon_factory(env={"CKPTD_FAILPOINTS": f"{point}=kill@{kill_at}",
                            "CKPTD_FAILPOINTS_LOG": str(fp_log)})
    ms = open_ranks(d.addr)
    try:
        h1 = save_step(ms, 1)
        h1[0].wait(Level.LOCAL_DURABLE, timeout_s=60)
        # the dry run of step 1 confirms how often one step passes the point (so K is right)
        assert failpoint_hits(fp_log, point) == per_step, fp_log.read_text()
        for h in save_step(ms, 2):  # returns at STAGED; the drain then kills the daemon
            assert h.ok, h.error
        assert wait_dead(d) == -9, d.log()
    finally:
        close_all(ms)
    # The kill came at hit kill_at. The W shards are written in parallel, so another writer may
    # log one more pass of a per-shard point between that hit's log line and the signal landing.
    assert kill_at <= failpoint_hits(fp_log, point) < kill_at + W

    # What the kill left on disk: step 2 is committed iff its manifest was linked.
    assert (step_dir(d.root, 2) / "manifest.json").exists() == commits
    if not commits:
        assert step_dir(d.root, 2).exists()  # a partial step directory for recovery to remove
    # Two node restarts from the same crash: one on the disk alone, one with shm intact.
    root_b = snapshot(d.root, tmp_path / "root-b")
    shm_b = snapshot(d.shm_dir, Path("/dev/shm") / f"ckptd-test-{uuid.uuid4().hex[:10]}")
    shutil.rmtree(d.shm_dir)

    # -- restart A: shm wiped, the disk tier is all there is ----------------------------------
    a = daemon_factory(root=d.root, shm_dir=d.shm_dir)
    assert disk_leftovers(a.root) == []
    if not commits:
        assert "recovery removed uncommitted" in a.log()
    ms = open_ranks(a.addr)
    try:
        with Raw(a.addr) as raw:
            seen = committed_steps_everywhere(ms[0], raw)
            want = [1, 2] if commits else [1]
            assert seen == {"all_steps": want, "latest": want[-1], "listed": want}, seen
            if not commits:
                assert rpc_code(lambda: raw.step_status(2)) == grpc.StatusCode.NOT_FOUND
        restore_all(ms, 1, "disk")
        if commits:
            restore_all(ms, 2, "disk")
        else:
            # the trainer resumes from step 1 and saves step 2 again: that must just work
            h2 = save_step(ms, 2)
            assert all(h.ok for h in h2), [h.error for h in h2]
            h2[0].wait(Level.LOCAL_DURABLE, timeout_s=60)
            restore_all(ms, 2, "memory")
            assert disk_leftovers(a.root) == []
    finally:
        close_all(ms)

    # -- restart B: shm intact, step 2's verified slots are re-adopted and drained again -------
    b = daemon_factory(root=root_b, shm_dir=shm_b)
    assert f"re-adopted slot of {JOB}@2 rank 0" in b.log()
    assert f"re-adopted slot of {JOB}@2 rank 1" in b.log()
    ms = open_ranks(b.addr)
    try:
        with Raw(b.addr) as raw:
            raw.wait_step(2, Level.LOCAL_DURABLE, timeout_s=60)
            assert raw.tier_state(2, "disk") == "COMMITTED"
            seen = committed_steps_everywhere(ms[0], raw)
            assert seen == {"all_steps": [1, 2], "latest": 2, "listed": [1, 2]}, seen
        assert disk_leftovers(b.root) == []
        restore_all(ms, 2, "memory")
        restore_all(ms, 1, "memory")
    finally:
        close_all(ms)
    # the re-drained step 2 on disk is exactly what was staged before the crash
    staged = {r: slot_of(shm_b, 2, r)[1]["shard"]["chunk_crc32c"] for r in range(W)}
    verify_disk_step(root_b, 2, staged)


def test_sigkill_before_sidecar_never_commits_the_step(daemon_factory, tmp_path):
    """Killed after CommitShard returned but before the checksummed slot was recorded: step 2
    never counts as committed after the restart, and the resumed trainer can save it again."""
    fp_log = tmp_path / "failpoints.log"
    # two sidecar writes per shard: "crc pending" right after CommitShard, then with the checksums
    d = daemon_factory(env={"CKPTD_FAILPOINTS": f"shm.sidecar.before_write=kill@{2 * W + 1}",
                            "CKPTD_FAILPOINTS_LOG": str(fp_log)})
    ms = open_ranks(d.addr)
    try:
        save_step(ms, 1)[0].wait(Level.LOCAL_DURABLE, timeout_s=60)
        assert failpoint_hits(fp_log, "shm.sidecar.before_write") == 2 * W
        save_step(ms, 2)  # a save the daemon dies under degrades, it never raises into training
        assert wait_dead(d) == -9
    finally:
        close_all(ms)

    d2 = daemon_factory(root=d.root, shm_dir=d.shm_dir)
    ms = open_ranks(d2.addr)
    try:
        with Raw(d2.addr) as raw:
            seen = committed_steps_everywhere(ms[0], raw)
            assert seen == {"all_steps": [1], "latest": 1, "listed": [1]}, seen
        restore_all(ms, 1, "memory")
        h2 = save_step(ms, 2)
        assert all(h.ok for h in h2), [h.error for h in h2]
        h2[0].wait(Level.LOCAL_DURABLE, timeout_s=60)
        restore_all(ms, 2, "memory")
    finally:
        close_all(ms)


def test_sigkill_then_restart_with_shm_wiped_restores_from_disk(daemon_factory):
    d = daemon_factory()
    with manager(d.addr) as m:
        for step in (1, 2, 3):
            h = m.save(step, fault_state(step, 0, NBYTES))
            h.wait(Level.LOCAL_DURABLE, timeout_s=60)
    d.kill()
    shutil.rmtree(d.shm_dir)

    d2 = daemon_factory(root=d.root, shm_dir=d.shm_dir)
    assert "re-adopted" not in d2.log()
    with manager(d2.addr) as m:
        assert m.latest_step() == 3
        restore_checked(m, "latest", fault_state(3, 0, NBYTES), "disk")
        restore_checked(m, 2, fault_state(2, 0, NBYTES), "disk")
        # a restore re-warms the memory tier: the next restore of that step is served from RAM
        restore_checked(m, 3, fault_state(3, 0, NBYTES), "memory")


@pytest.mark.parametrize("lost", ["disk-data-removed", "disk-tier-off"])
def test_sigkill_then_restart_with_shm_intact_restores_from_memory(daemon_factory, lost):
    args = ["--no-disk"] if lost == "disk-tier-off" else []
    d = daemon_factory(extra_args=args)
    with manager(d.addr) as m:
        for step in (1, 2):
            h = m.save(step, fault_state(step, 0, NBYTES))
            h.wait(Level.STAGED, timeout_s=60)
        if lost == "disk-data-removed":
            h.wait(Level.LOCAL_DURABLE, timeout_s=60)
    d.kill()
    if lost == "disk-data-removed":
        shutil.rmtree(job_dir(d.root))
    assert len(sidecars(d.shm_dir)) == 2

    d2 = daemon_factory(root=d.root, shm_dir=d.shm_dir, extra_args=args)
    for step in (1, 2):
        assert f"re-adopted slot of {JOB}@{step} rank 0" in d2.log()
    with manager(d2.addr) as m:
        assert m.latest_step() == 2
        restore_checked(m, "latest", fault_state(2, 0, NBYTES), "memory")
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "memory")
        # the daemon goes on: the next step saves and (with a disk tier) reaches the disk again
        h = m.save(3, fault_state(3, 0, NBYTES))
        h.wait(Level.LOCAL_DURABLE if not args else Level.STAGED, timeout_s=60)
        restore_checked(m, "latest", fault_state(3, 0, NBYTES), "memory")


def test_corrupted_slot_is_not_readopted(daemon_factory):
    d = daemon_factory()
    with manager(d.addr) as m:
        for step in (1, 2):
            h = m.save(step, fault_state(step, 0, NBYTES))
        h.wait(Level.LOCAL_DURABLE, timeout_s=60)
    d.kill()
    slot, meta = slot_of(d.shm_dir, 2)
    flip_byte(slot, meta["shard"]["nbytes"] // 2)  # inside the shard, not in the slot's padding

    d2 = daemon_factory(root=d.root, shm_dir=d.shm_dir)
    assert "crc32c mismatch" in d2.log()
    assert f"re-adopted slot of {JOB}@1 rank 0" in d2.log()
    assert f"re-adopted slot of {JOB}@2 rank 0" not in d2.log()
    assert not slot.exists(), "the corrupted slot was kept"
    with manager(d2.addr) as m:
        assert m.latest_step() == 2
        restore_checked(m, "latest", fault_state(2, 0, NBYTES), "disk")
        assert m.last_restore is not None and m.last_restore.rejected == []
        restore_checked(m, 1, fault_state(1, 0, NBYTES), "memory")


def test_sigkill_before_the_crc_pass_keeps_the_staged_step(daemon_factory, tmp_path):
    """Killed after every shard of step 2 was recorded but before the last checksummed sidecar:
    the next daemon checksums the "crc pending" slot itself, re-adopts it, and step 2 restores
    bit-exact from memory (and reaches the disk)."""
    fp_log = tmp_path / "failpoints.log"
    d = daemon_factory(env={"CKPTD_FAILPOINTS": f"shm.sidecar.before_write=kill@{4 * W}",
                            "CKPTD_FAILPOINTS_LOG": str(fp_log)})
    ms = open_ranks(d.addr)
    try:
        save_step(ms, 1)[0].wait(Level.LOCAL_DURABLE, timeout_s=60)
        save_step(ms, 2)
        assert wait_dead(d) == -9
    finally:
        close_all(ms)
    d2 = daemon_factory(root=d.root, shm_dir=d.shm_dir)
    for rank in range(W):
        assert f"re-adopted slot of {JOB}@2 rank {rank}" in d2.log()
    ms = open_ranks(d2.addr)
    try:
        restore_all(ms, 2, "memory")
        ms[0]._wait(2, Level.LOCAL_DURABLE, 60)
    finally:
        close_all(ms)
