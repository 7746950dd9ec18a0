"""ckptd bugs the scenarios exposed: for each, where it was, the signature of the failures it
causes in a scenario outcome, a minimal reproduction that raises AssertionError while the bug is
there, and the commit that fixed it (empty while open).

The reproductions of fixed bugs run as regression tests. While a bug is open, its reproduction is a
strict expected failure (it turns red once fixed: then record ``fixed_in``), and ``known_bug``
names it for a failed scenario outcome whose every failure is that bug's, so the suite marks such a
run as an expected failure with the bug's description (any other failure still fails;
``CKPTD_FAULT_STRICT=1`` turns the marking off).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from ckptd_client import CheckpointManager, CkptdError, Level, NotFound

from tests.fault.scenarios import Outcome
from tests.fault.scenarios._env import Env
from tests.state_factory import filled_state

MiB = 2**20


@dataclass(frozen=True)
class KnownBug:
    id: str
    title: str
    where: str
    repro: Callable[[Env], None]
    checks: dict[str, str] = field(default_factory=dict)  # check name -> regex every message of it matches
    error: str = ""  # regex the scenario's error matches (a scenario that could not go on)
    scenarios: tuple[str, ...] = ()  # only in these scenarios ((): any)
    fixed_in: str = ""  # the commit that fixed it; empty while open

    def matches(self, out: Outcome) -> bool:
        if self.fixed_in or out.ok or (self.scenarios and out.scenario not in self.scenarios):
            return False
        if out.error and not (self.error and re.search(self.error, out.error)):
            return False
        for key, msg in out.checks.items():
            if msg == "ok":
                continue
            pattern = self.checks.get(key.rsplit(":", 1)[-1])
            if pattern is None or not all(re.search(pattern, m) for m in msg.split(" | ")):
                return False
        return bool(out.error) or any(v != "ok" for v in out.checks.values())


def _stale_listing(env: Env) -> None:
    n = env.node("n1", env.workdir / f"repro-{uuid.uuid4().hex[:6]}", extra={"disk": {"enabled": False}}).start()
    with CheckpointManager("j", rank=0, world_size=1, addr=n.addr) as m:
        for step in (1, 2, 3, 4):  # slots are reused: only the newest steps stay in memory
            m.save(step, filled_state(step, 2**16)).wait(Level.STAGED, timeout_s=30)
        listed = m.all_steps()
        try:
            m.restore(filled_state(0, 2**16), step=listed[0])
        except NotFound as exc:
            raise AssertionError(f"all_steps() lists {listed}, restore of {listed[0]}: {exc}") from None
    n.kill()


def _no_upload_after_restart(env: Env) -> None:
    n = env.node("n1", env.workdir / f"repro-{uuid.uuid4().hex[:6]}", object=env.object_config(),
                 faults={"CKPTD_FAILPOINTS": "object.upload.before_shard=kill"}).start()
    with CheckpointManager("j", rank=0, world_size=1, addr=n.addr) as m:
        m.save(1, filled_state(1, 2**16))
    n.wait_dead(30)
    n.restart(wipe_shm=True)  # a reboot: the step is committed on disk, not yet in the store
    with CheckpointManager("j", rank=0, world_size=1, addr=n.addr) as m:
        try:
            m._wait(1, Level.PERSISTED, 8)
        except CkptdError as exc:
            raise AssertionError(f"a step committed on disk is never uploaded after the restart: {exc}") from None
    n.kill()


def _restore_drops_inflight_step(env: Env) -> None:
    n = env.node("n1", env.workdir / f"repro-{uuid.uuid4().hex[:6]}").start()
    ms = [CheckpointManager("j", rank=r, world_size=2, addr=n.addr) for r in range(2)]
    for m in ms:
        m.save(1, filled_state(1, 2**16))
    ms[0]._wait(1, Level.LOCAL_DURABLE, 30)
    assert ms[0].save(2, filled_state(2, 2**16)).ok  # rank 0 staged step 2
    assert ms[1].restore(filled_state(0, 2**16)) == 1  # another process of rank 1 restores meanwhile
    assert ms[1].save(2, filled_state(2, 2**16)).ok  # rank 1 stages step 2: both save() calls returned STAGED
    try:
        ms[0]._wait(2, Level.STAGED, 3)
    except CkptdError as exc:
        raise AssertionError(f"both ranks' save() of step 2 returned, the step never commits: {exc}") from None
    finally:
        for m in ms:
            m.close()
        n.kill()


def _read_drops_acked_step(env: Env) -> None:
    n = env.node("n1", env.workdir / f"repro-{uuid.uuid4().hex[:6]}").start()
    ms = [CheckpointManager("j", rank=r, world_size=2, addr=n.addr) for r in range(2)]
    try:
        for m in ms:
            m.save(1, filled_state(1, 2**16))
        ms[0]._wait(1, Level.LOCAL_DURABLE, 30)
        assert ms[0].save(2, filled_state(2, 2**16)).ok  # rank 0 staged step 2
        with CheckpointManager("j", rank=0, world_size=2, addr=n.addr) as reader:  # an operator's restore
            assert reader.restore(filled_state(0, 2**16), step=1) == 1
        assert ms[1].save(2, filled_state(2, 2**16)).ok
        try:
            ms[0]._wait(2, Level.STAGED, 3)
        except CkptdError as exc:
            raise AssertionError(f"a read of step 1 dropped rank 0's acknowledged step 2: {exc}") from None
    finally:
        for m in ms:
            m.close()
        n.kill()


def _corrupt_newest_stops_resume(env: Env) -> None:
    d = env.workdir / f"repro-{uuid.uuid4().hex[:6]}"
    n = env.node("n1", d).start()
    with CheckpointManager("j", rank=0, world_size=1, addr=n.addr) as m:
        for step in (1, 2):
            m.save(step, filled_state(step, 2**16))
        m._wait(2, Level.LOCAL_DURABLE, 30)
    n = n.restart(wipe_shm=True)
    shard = n.data_dir / "j" / f"step-{2:012d}" / "rank-000000.shard"
    with open(shard, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    try:
        with CheckpointManager("j", rank=0, world_size=1, addr=n.addr) as m:
            try:
                got = m.restore(filled_state(0, 2**16))
            except CkptdError as exc:
                raise AssertionError(f"restore('latest') stopped on the corrupt newest step: {exc}") from None
            assert got == 1, f"resumed from step {got}, expected 1"
    finally:
        n.kill()


def _multipart_left(env: Env) -> None:
    from tests.tiers.faultproxy import Request

    proxy = env.proxy()
    prefix_job = f"mp{uuid.uuid4().hex[:6]}"
    n = env.node("n1", env.workdir / f"repro-{uuid.uuid4().hex[:6]}", object=env.object_config(
        endpoint=proxy.url, total_timeout_s=4.0, connect_timeout_s=0.5, read_timeout_s=1.0, max_attempts=2)).start()
    big = {"w": np.ones(6 * MiB // 4, np.float32)}
    with CheckpointManager(prefix_job, rank=0, world_size=1, addr=n.addr) as m:
        proxy.add("down", match=Request.is_chunk_put, down_s=3600)  # down in the middle of the upload
        m.save(1, big)
        try:
            m._wait(1, Level.PERSISTED, 30)
        except CkptdError:
            pass
        proxy.up()
        m.save(2, big)
        m._wait(2, Level.PERSISTED, 30)  # the store is back and the daemon uses it again
    s3 = env.store()
    ups = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=f"{s3.prefix}/{prefix_job}/").get("Uploads", [])
    n.kill()
    assert not ups, f"{len(ups)} multipart upload(s) of the outage never aborted: {[u['Key'] for u in ups]}"


def _rewarm_fills_budget(env: Env) -> None:
    n = env.node("n1", env.workdir / f"repro-{uuid.uuid4().hex[:6]}", extra={
        "disk": {"max_to_keep": 10}, "memory": {"wait_timeout_s": 1.0}})
    n.budget_bytes = 8 * MiB  # four 2 MiB slots
    n.start()
    with CheckpointManager("j", rank=0, world_size=1, addr=n.addr) as m:
        for step in range(1, 6):
            m.save(step, filled_state(step, 2**16)).wait(Level.LOCAL_DURABLE, timeout_s=30)
    n.restart(wipe_shm=True)
    with CheckpointManager("j", rank=0, world_size=1, addr=n.addr) as m:
        for step in range(1, 6):  # each restore stays in memory as a re-warmed copy
            try:
                m.restore(filled_state(0, 2**16), step=step)
            except CkptdError as exc:
                raise AssertionError(f"restore of step {step} (the newest) failed: {type(exc).__name__}: {exc}") \
                    from None
    n.kill()


def _recovery_reports_unremoved(env: Env) -> None:
    from tests.fault.scenarios import Skip

    n = env.node("n1", env.workdir / f"repro-{uuid.uuid4().hex[:6]}")
    why = env.mount_tmpfs(n.data_dir, 16 * MiB)
    if why:
        raise Skip(f"needs a tmpfs mount (mount failed: {why})")
    try:
        n.start().kill()
        tmp = n.data_dir / "j" / "step-000000000001" / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)  # what a daemon killed mid-write leaves
        env.remount(n.data_dir, "ro")  # the disk turned read-only meanwhile
        n.start()
        assert f"recovery removed uncommitted {tmp}" not in n.log() or not tmp.exists(), \
            f"the log says recovery removed {tmp}, which is still there"
    finally:
        n.kill()
        env.umount(n.data_dir)


KNOWN_BUGS = (
    KnownBug(
        "stale-committed-listing",
        "ListSteps/all_steps() report a step committed after its only copy is gone (memory slots reused, "
        "disk failed or skipped it); restoring it answers NotFound",
        "ckptd/rpc/server.py ListSteps: committed=s.level() is not None or s.in_memory; StepState.level() "
        "(ckptd/memory/catalog.py) counts the raw memory state COMMITTED that effective() reports REMOVED",
        _stale_listing, checks={"committed": "listed committed while no tier holds it"}, fixed_in="e275e36"),
    KnownBug(
        "no-upload-after-restart",
        "a step committed on disk but not yet in the object store is never uploaded by a daemon restarted "
        "without its shared memory (reboot): PERSISTED is never reached",
        "ckptd/drains/upload.py ObjectUploader._next (pending steps need s.shards) and _upload (iterates st.shards): "
        "steps catalogued from disk manifests at start-up have no shard records",
        _no_upload_after_restart, error=r"did not reach PERSISTED: Timeout", scenarios=("daemon_kill_mid_upload",),
        fixed_in="4215b2d"),
    KnownBug(
        "restore-drops-inflight-step",
        "a restore while a later step is in flight drops the ranks already staged (no save lease left), so "
        "the step never commits although every rank's save() returned STAGED",
        "ckptd/restore/service.py RestoreService._drop_partial_steps_after (run by every restore): only a "
        "live save lease protects a partial later step",
        _restore_drops_inflight_step, checks={"acked": r"NotFound: step \d+ of job .* is not committed"},
        scenarios=("restore_during_save",), fixed_in="b6cc714"),
    KnownBug(
        "read-drops-acked-step",
        "any restore of an older step for a rank (an operator's ckptctl restore, an evaluation reader) drops "
        "that rank's shard of a later step in flight, so the step never commits although save() returned",
        "ckptd/restore/service.py RestoreService._drop_partial_steps_after took any restore for a rank as a "
        "restart of its trainer; now a new writer incarnation's save drops only its own rank's stale shards "
        "(ckptd/save/service.py SavePath._drop_stale_shards)",
        _read_drops_acked_step, checks={"acked": r"NotFound: step \d+ of job .* is not committed"},
        error=r"never committed after a read", scenarios=("reader_during_save",), fixed_in="01de1d8"),
    KnownBug(
        "corrupt-newest-stops-resume",
        "restore('latest') picks a newest step with no valid copy left (a flipped byte in its only disk "
        "copy, a truncated manifest) and raises IntegrityError: an auto-resuming job stops instead of "
        "resuming from the newest older step that restores",
        "ckptd/restore/service.py RestoreService._restore (no fallback for 'latest'); the client's "
        "restore had no strict_latest choice",
        _corrupt_newest_stops_resume, error=r"resumed from step|expected", scenarios=("corrupt_newest_step",),
        fixed_in="0a2508b"),
    KnownBug(
        "multipart-left-after-outage",
        "a multipart upload cut by a store outage is never aborted once the store is back (its abort failed "
        "during the outage; only start-up cleanup of uploads older than stale_upload_age_s removes it)",
        "ckptd/tiers/object_client.py (one abort attempt of a failed multipart upload, not retried later); "
        "ckptd/daemon/adoption.py runs cleanup_incomplete(stale_upload_age_s) at start-up only",
        _multipart_left, checks={"leaks": "multipart upload left unfinished"}, scenarios=("object_down",),
        fixed_in="f2b1ef6"),
    KnownBug(
        "rewarm-fills-budget",
        "copies re-warmed by restores are never evicted for a later restore: once they fill the shm budget, "
        "every restore from disk, peer or store fails, reported as IntegrityError 'no valid copy'",
        "ckptd/memory/slots.py SlotPool.lease_scratch (reusable only if content is None), used by "
        "ckptd/restore/planner.py "
        "Restorer.execute's scratch lease (read_into of the disk, peer and object sources in "
        "ckptd/restore/sources); the BudgetExhausted is folded into IntegrityError by execute()",
        _rewarm_fills_budget, fixed_in="9ea392d"),
    KnownBug(
        "recovery-reports-unremoved",
        "start-up recovery logs 'recovery removed uncommitted <path>' for temp and uncommitted step "
        "directories it could not remove (read-only or failing disk): the log says the disk is clean when "
        "it is not (the leftovers are harmless, never listed, and removed by a later recovery)",
        "ckptd/tiers/disk.py DiskTier.recover appends every path after FsOps.rmtree (ckptd/core/fsops.py), "
        "which ignores errors",
        _recovery_reports_unremoved, checks={"leaks": "recovery logged as removed what is still there"},
        scenarios=("disk_readonly",), fixed_in="fb726fd"),
)


def known_bug(out: Outcome) -> KnownBug | None:
    return next((b for b in KNOWN_BUGS if b.matches(out)), None)
