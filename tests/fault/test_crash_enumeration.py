"""Crash-point enumeration of the disk tier (DESIGN.md sections 3 and 9).

Workload (a daemon's use of its disk tier): recovery on a fresh root, two steps of four shards
(sizes around the O_DIRECT alignment and above the write block: direct body, buffered tail and
buffered-only writes all run), each committed, retention (``max_to_keep=1``) deleting the older
step after the newer commit. It runs once through ``crashsim.Recorder``, which counts N file
mutations; for every k in 0..N the state a crash before mutation k+1 leaves, in three flavours
(crash, power, torn; see crashsim), is written to a fresh directory, recovered and checked:

- recovery succeeds and leaves no ``.tmp-*`` and no step directory without a manifest;
- no acknowledged step is lost: a step whose ``commit`` returned before the crash is listed,
  unless retention legitimately removed it (its ``delete`` had done at least one mutation, and
  had started after a newer step's ``commit`` returned);
- no partial or mixed step is committed: every listed step was saved, its manifest is
  byte-identical to the committed one and every shard is exactly that step's bytes;
- no corruption is returned as success: every read of every saved step, before and after
  recovery, returns the exact bytes or raises IntegrityError / NotFound;
- the tier takes a new save afterwards (the newest step again if it is not listed, else the next).

Recovery from every distinct crash and power state is itself enumerated the same way (second
level). Mutants without file or directory fsyncs show the checks fail on a broken commit. The pin
store's rewrite is enumerated too. A real daemon is SIGKILLed at its k-th file mutation (failpoint
``fs.mutation``) for a daily-rotating subset of k (every k with ``CKPTD_CRASH_ENUM_POINTS=all``),
restarted with its shm wiped and checked through the client. Counts are printed and, with
``CKPTD_RELIABILITY_OUT`` set, merged into that JSON file.
"""

from __future__ import annotations

import datetime
import itertools
import math
import mmap
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckptd.core.errors import IntegrityError, NotFound
from ckptd.core.fsops import MUTATION
from ckptd.core.integrity import chunk_crcs
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import Level
from ckptd.drains.pins import PinStore
from ckptd.drains.retention import select_for_deletion
from ckptd.tiers.disk import DIRECT_ALIGN_BYTES as A
from ckptd.tiers.disk import DiskTier
from tests.conftest import wait_for_daemon
from tests.fault.crashreport import Tally, report
from tests.fault.crashsim import (
    FLAVOURS,
    Found,
    Model,
    Recorder,
    View,
    fingerprint,
    materialise,
    read_tree,
    record,
)
from tests.fault.faultkit import disk_leftovers, manager, restore_checked, step_dir, wait_until
from tests.state_factory import fault_state

JOB = "crashjob"
BLOCK_BYTES = 8192
CHUNK_BYTES = 4096
SHARD_NBYTES = [3 * A + 7, 2 * A + 100, A + 1, 1000]  # 2 direct blocks + tail, 1 + tail, 1 + 1 byte, buffered
STEPS = (1, 2)


@dataclass
class Saved:
    manifest: Manifest
    blobs: list[bytes]
    views: list[memoryview]  # page-aligned copies (like shm slots), for O_DIRECT


def make_step(step: int, generation: int = 0) -> Saved:
    entries, blobs, views = [], [], []
    for rank, n in enumerate(SHARD_NBYTES):
        blob = random.Random(f"{step}/{rank}/{generation}").randbytes(n)
        mm = mmap.mmap(-1, n)
        mm[:] = blob
        entries.append(ShardEntry(rank, n, CHUNK_BYTES, tuple(chunk_crcs(blob, CHUNK_BYTES)),
                                  (TensorEntry("blob", "uint8", (n,), 0, n),), {"d": [["blob", {"t": 0}]]}))
        blobs.append(blob)
        views.append(memoryview(mm))
    m = Manifest(JOB, step, len(SHARD_NBYTES), tuple(entries), 1000.0 + step, {"generation": generation})
    return Saved(m, blobs, views)


SAVED = {s: make_step(s) for s in STEPS}


def save(tier: DiskTier, saved: Saved) -> None:
    for entry, view in zip(saved.manifest.shards, saved.views):
        tier.put_shard(JOB, saved.manifest.step, entry, view)
    tier.commit(saved.manifest)


def workload(tier: DiskTier, rec: Recorder) -> None:
    """Daemon start, two steps drained and committed, disk retention after each commit."""
    tier.recover()
    for step in STEPS:
        save(tier, SAVED[step])
        rec.note(f"ack {step}")
        for doomed in select_for_deletion(tier.list_committed(JOB), max_to_keep=1):
            rec.note(f"delete {doomed}")
            tier.delete(JOB, doomed)


def acknowledged(notes: list[tuple[int, str]], k: int) -> tuple[frozenset[int], frozenset[int]]:
    """(steps whose commit returned within k mutations, those of them retention may have removed)."""
    acks = {int(e.split()[1]): i for i, e in notes if e.startswith("ack ")}
    deletes = {int(e.split()[1]): i for i, e in notes if e.startswith("delete ")}
    acked = frozenset(s for s, i in acks.items() if i <= k)
    removable = {s for s, d in deletes.items() if d < k and any(t > s and acks[t] <= d for t in acks)}
    return acked, acked & removable


# -- the invariants -----------------------------------------------------------------------------
def read_back(tier: DiskTier, saved: Saved) -> tuple[bool, list[str]]:
    """Read a step's manifest and shards: (every read exact, reads that returned wrong bytes or
    raised anything but IntegrityError / NotFound)."""
    step = saved.manifest.step

    def read(entry: ShardEntry | None) -> bytes:
        if entry is None:
            return tier.read_manifest(JOB, step).to_json()
        dst = bytearray(entry.nbytes)
        tier.read_shard_into(JOB, step, entry, memoryview(dst))
        return bytes(dst)

    reads: list[tuple[str, ShardEntry | None, bytes]] = [("manifest", None, saved.manifest.to_json())]
    reads += [(f"rank {e.rank}", e, b) for e, b in zip(saved.manifest.shards, saved.blobs)]
    exact, corrupt = True, []
    for what, entry, want in reads:
        try:
            got = read(entry)
        except (IntegrityError, NotFound):
            exact = False
            continue
        except Exception as exc:  # noqa: BLE001 - any other outcome is a violation
            got = repr(exc).encode()
        if got != want:
            exact = False
            corrupt.append(f"step {step} {what}: returned {got[:60]!r}")
    return exact, corrupt


class Checker:
    """Checks states (materialised views) once each; identical states share one verdict."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.seq = itertools.count()
        self.verdicts: dict[tuple[str, frozenset[int], frozenset[int]], Found] = {}
        self.resaves: dict[str, Found] = {}

    def check(self, view: View, acked: frozenset[int], removable: frozenset[int]) -> Found:
        key = (fingerprint(view), acked, removable)
        if key not in self.verdicts:
            d = self.workdir / f"s{next(self.seq)}"
            materialise(view, d)
            try:
                self.verdicts[key] = self._check_dir(d / "data", acked, removable)
            finally:
                shutil.rmtree(d)
        return self.verdicts[key]

    def _check_dir(self, root: Path, acked: frozenset[int], removable: frozenset[int]) -> Found:
        tier = DiskTier(root, direct_io=True, block_bytes=BLOCK_BYTES)
        bad = [("corrupt", f"before recovery: {c}") for s in STEPS for c in read_back(tier, SAVED[s])[1]]
        try:
            tier.recover()
        except Exception as exc:  # noqa: BLE001
            return bad + [("recovery", f"recover() raised {exc!r}")]
        bad += [("recovery", f"left after recovery: {p}") for p in disk_leftovers(root.parent, JOB)]
        listed = tier.list_committed(JOB)
        bad += [("partial", f"step {s} listed but not exactly as saved") for s in listed
                if s not in SAVED or not read_back(tier, SAVED[s])[0]]
        bad += [("lost", f"acknowledged step {s} not listed (listed: {listed})")
                for s in sorted(acked - removable) if s not in listed]
        bad += [("corrupt", f"after recovery: {c}") for s in STEPS for c in read_back(tier, SAVED[s])[1]]
        tree = fingerprint({p: (0, c) if c is not None else None for p, c in read_tree(root).items()})
        if tree not in self.resaves:  # same recovered tree, same outcome
            again = make_step(max(STEPS) + (max(STEPS) in listed), generation=1)
            try:
                save(tier, again)
                ok = again.manifest.step in tier.list_committed(JOB) and read_back(tier, again) == (True, [])
                self.resaves[tree] = [] if ok else [("resave", f"step {again.manifest.step} not read back")]
            except Exception as exc:  # noqa: BLE001
                self.resaves[tree] = [("resave", f"saving step {again.manifest.step} raised {exc!r}")]
        return bad + self.resaves[tree]


# -- the enumeration ----------------------------------------------------------------------------
def check_inside_recovery(checker: Checker, tally: Tally, view: View, model: Model, flavour: str,
                          acked: frozenset[int], removable: frozenset[int]) -> None:
    """Second level: crash (and lose power) at every mutation of recovery from this state."""
    d = checker.workdir / f"r{next(checker.seq)}"
    materialise(view, d)
    start = model.clone() if flavour == "crash" else Model.from_tree(d)  # after a power loss all is durable
    try:
        rec, snaps, mismatches = record(d, start, lambda r: DiskTier(d / "data", fs=r).recover())
    except Exception as exc:  # noqa: BLE001
        tally.add([("recovery", f"recover() raised {exc!r}")], f"recording recovery of a {flavour} state")
        return
    finally:
        shutil.rmtree(d)
    tally.model_mismatches += mismatches
    tally.recovery_crash_points += len(rec.ops)
    for j, snap in enumerate(snaps[1:-1], start=1):  # 0 and M are first-level states
        for inner in ("crash", "power"):
            tally.recovery_states[inner] += 1
            tally.add(checker.check(snap.view(inner), acked, removable), f"{flavour}, recovery {inner} @{j}")


def enumerate_crashes(tmp: Path, skip: tuple[str, ...] = (), second_level: bool = True) -> Tally:
    base = tmp / "workload"
    base.mkdir()
    rec, snapshots, mismatches = record(
        base, Model(), lambda r: workload(DiskTier(base / "data", True, BLOCK_BYTES, fs=r), r), skip)
    tally = Tally(crash_points=len(rec.ops), model_mismatches=mismatches)
    tally.op_kinds.update(op.split()[0] for op in rec.ops)
    checker = Checker(tmp)
    assert len(snapshots) == len(rec.ops) + 1
    for k, model in enumerate(snapshots):
        acked, removable = acknowledged(rec.notes, k)
        for flavour in FLAVOURS:
            tally.states[flavour] += 1
            view = model.view(flavour)
            fresh = (fingerprint(view), acked, removable) not in checker.verdicts
            tally.add(checker.check(view, acked, removable), f"{flavour} @{k} ({rec.ops[k - 1] if k else 'start'})")
            if second_level and fresh and flavour != "torn":
                check_inside_recovery(checker, tally, view, model, flavour, acked, removable)
    tally.distinct_states = len(checker.verdicts)
    return tally


# -- in-process tests ---------------------------------------------------------------------------
def test_every_crash_point_of_a_disk_save(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    tally = enumerate_crashes(tmp_path)
    line = report("crash_enumeration", {**tally.summary(), "seconds": round(time.monotonic() - t0, 2)}, capsys)
    n = tally.crash_points
    assert all(tally.states[f] == n + 1 for f in FLAVOURS), line  # 100%: every k = 0..N, every flavour
    assert tally.recovery_crash_points > 0 and tally.recovery_states["power"] > 0, line
    kinds = tally.op_kinds  # every kind of mutation ran, O_DIRECT and buffered
    assert {"open", "open-direct", "pwrite", "fsync", "fsync_dir", "mkdir", "link", "unlink", "rmdir"} <= set(kinds)
    assert kinds["open-direct"] == len(STEPS) * sum(nb >= A for nb in SHARD_NBYTES), kinds
    assert kinds["link"] == len(STEPS) * (len(SHARD_NBYTES) + 1), kinds  # each shard and manifest once
    assert tally.model_mismatches == [], f"the model diverged from the real tree at {tally.model_mismatches}"
    assert sum(tally.violations.values()) == 0, line + "\n" + "\n".join(tally.examples)


@pytest.mark.parametrize("dropped,caught", [("fsync", "partial"), ("fsync_dir", "lost")])
def test_the_checks_catch_a_commit_without_fsync(tmp_path: Path, dropped: str, caught: str) -> None:
    """A tier that skips its file (directory) fsyncs lists torn steps (loses committed ones)."""
    tally = enumerate_crashes(tmp_path, skip=(dropped,), second_level=False)
    assert tally.model_mismatches == []
    assert tally.violations[caught] > 0, tally.summary()


def test_every_crash_point_of_a_pin_change(tmp_path: Path) -> None:
    """After a crash or power loss anywhere in a pin change, the pins read back are the set of
    the last change that returned, or of the one in flight; never a torn or empty file."""
    sets = [set(), {5}, {5, 7}, {7}, set()]  # pin 5, pin 7, unpin 5, unpin 7
    base = tmp_path / "pins-run"
    base.mkdir()

    def run(rec: Recorder) -> None:
        store = PinStore(base / "pins", fs=rec)
        for before, after in itertools.pairwise(sets):
            (step,) = before ^ after
            store.change("job", step, pinned=step in after)
            rec.note("ack")

    rec, snapshots, mismatches = record(base, Model(), run)
    assert mismatches == [] and len(snapshots) == len(rec.ops) + 1 > 4 * 3
    for k, model in enumerate(snapshots):
        done = sum(1 for i, _ in rec.notes if i <= k)
        allowed = sets[done:done + 2]
        for flavour in FLAVOURS:
            d = tmp_path / f"pins-{k}-{flavour}"
            materialise(model.view(flavour), d)
            store = PinStore(d / "pins")
            store.load()
            assert store.get("job") in allowed, (k, flavour, rec.ops[k - 1] if k else "start")


# -- the real daemon ----------------------------------------------------------------------------
W = 4
STATE_NBYTES = 3 * 16384 + 5000
DAEMON_POINTS = 12  # kill points per run; the subset rotates daily
DAEMON_CONFIG = "[disk]\nmax_to_keep = 1\nwrite_block_bytes = 16384\n"


def daemon_run(daemon_factory: Any, env: dict[str, str]) -> tuple[Any, list[int]]:
    """Start a daemon on a fresh root, save steps 1 and 2 on W ranks; return it and the steps
    the client saw reach LOCAL_DURABLE (stops at the first failure: the daemon died)."""
    d = daemon_factory(env=env, config_text=DAEMON_CONFIG, wait=False)
    try:
        wait_for_daemon(d.socket, d.proc, d.log_path)
    except RuntimeError:
        return d, []  # killed during start-up recovery
    ms = [manager(d.addr, rank=r, world_size=W) for r in range(W)]
    acked: list[int] = []
    try:
        for step in STEPS:
            hs = [m.save(step, fault_state(step, m.rank, STATE_NBYTES)) for m in ms]
            try:
                hs[0].wait(Level.LOCAL_DURABLE, timeout_s=60)
            except Exception:  # noqa: BLE001 - the daemon died under the save
                break
            acked.append(step)
    finally:
        for m in ms:
            m.close()
    return d, acked


def count_daemon_mutations(daemon_factory: Any, fp_log: Path) -> int:
    """N for the daemon: the file mutations of a clean run, once retention has removed step 1."""
    d, acked = daemon_run(daemon_factory, {"CKPTD_FAILPOINTS_LOG": str(fp_log)})
    assert acked == list(STEPS), d.log()

    def hits() -> int:
        return sum(1 for line in fp_log.read_text().splitlines() if line == MUTATION)

    wait_until(lambda: not step_dir(d.root, 1).exists(), 20, "retention of step 1")
    n = hits()
    time.sleep(0.2)
    assert hits() == n, "the daemon is still mutating files"
    d.kill()
    return n


def daemon_kill_points(n: int) -> list[int]:
    """k in 1..n to SIGKILL at: ``CKPTD_CRASH_ENUM_POINTS`` (``all`` or ``k,k,...``), else every
    stride-th k from an offset that changes daily (all k over ``stride`` days), and k = n."""
    spec = os.environ.get("CKPTD_CRASH_ENUM_POINTS", "")
    if spec == "all":
        return list(range(1, n + 1))
    if spec:
        return [int(k) for k in spec.split(",")]
    stride = math.ceil(n / DAEMON_POINTS)
    offset = datetime.date.today().toordinal() % stride
    return sorted(set(range(1 + offset, n + 1, stride)) | {n})


def check_restarted(daemon_factory: Any, d: Any, acked: list[int]) -> list[int]:
    """Restart on the killed daemon's root with its shm wiped (the disk is all there is), check
    the invariants through the client; return the steps listed as committed."""
    shutil.rmtree(d.shm_dir, ignore_errors=True)
    a = daemon_factory(root=d.root, shm_dir=d.shm_dir, config_text=DAEMON_CONFIG)
    assert disk_leftovers(a.root) == [], a.log()
    ms = [manager(a.addr, rank=r, world_size=W) for r in range(W)]
    try:
        listed: list[int] = list(ms[0].all_steps())
        assert set(listed) <= set(STEPS), listed
        for step in acked:  # gone only if retention removed it for a newer committed step
            assert step in listed or any(s > step for s in listed), (step, listed, acked)
        for step in listed:  # every committed step is whole and exact
            for m in ms:
                restore_checked(m, step, fault_state(step, m.rank, STATE_NBYTES), "disk")
        nxt = max(STEPS) + (max(STEPS) in listed)
        hs = [m.save(nxt, fault_state(nxt, m.rank, STATE_NBYTES)) for m in ms]
        assert all(h.ok for h in hs), [h.error for h in hs]
        hs[0].wait(Level.LOCAL_DURABLE, timeout_s=60)
        assert nxt in ms[0].all_steps()
    finally:
        for m in ms:
            m.close()
    a.kill()
    return listed


def test_sigkill_the_daemon_at_its_file_mutations(daemon_factory: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    n = count_daemon_mutations(daemon_factory, tmp_path / "count.log")
    assert n > len(STEPS) * (W + 1) * 5, n  # per shard and manifest: create, write, fsync, link, fsync_dir
    points = daemon_kill_points(n)
    outcomes: Counter[str] = Counter()
    for k in points:
        d, acked = daemon_run(daemon_factory, {"CKPTD_FAILPOINTS": f"{MUTATION}=kill@{k}"})
        assert d.proc.wait(30) == -9, f"kill@{k} of {n}: the daemon was not killed\n{d.log()}"
        listed = check_restarted(daemon_factory, d, acked)  # raises on a violation
        outcomes[f"acked={acked} listed={listed}"] += 1
    report("crash_enumeration_daemon", {
        "mutations": n, "kill_points": points, "coverage": round(len(points) / n, 3),
        "outcomes": dict(outcomes), "violations": 0, "seconds": round(time.monotonic() - t0, 1)}, capsys)
