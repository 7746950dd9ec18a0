"""The one invariant checker of the fault scenarios (DESIGN.md sections 2, 3 and 9).

A scenario records every save in a ``Ledger`` (which variant of which (step, rank) it wrote, what
the save() call returned and how long it blocked, which durability levels each step was
acknowledged at), injects its fault and records in the ledger what the fault destroyed (a daemon,
a node's memory or disk, a whole node), says in an ``Expect`` what it knows of the state after it
(copies left with no valid source, the tier that must serve, nodes down on purpose or restarted),
and calls ``check``. The checker then verifies, against the live daemons and the object store:

* ``acked``: no acknowledged checkpoint is lost at the level it was acknowledged: for every level
  and rank, the newest step acknowledged at that level restores bit-exact, unless every copy the
  level promises was destroyed by the declared fault;
* ``committed``: every step any daemon (or the store) lists as committed restores bit-exact for
  each of its ranks; nothing partial or mixed (tensors of another step or rank) is committed;
* ``corruption``: no restore succeeds with bytes other than the ones saved; a destroyed copy is
  reported as a clear error (IntegrityError / NotFound), never served;
* ``serving``: every daemon expected up answers health and ListSteps;
* ``leaks``: no ``.tmp-*`` file on disk, no manifest-less step directory after a restart, no shm
  file the pool does not own, no slot bytes over the budget, no removed slot still mapped by the
  daemon, no unfinished multipart upload;
* ``deadline``: no save() call blocked training past the configured deadline.

What a daemon says of the job's steps (tier states, settling, lasting temp files) is asked in
tests/fault/_node_state.py. States are numpy trees derived from (seed, step, rank, variant)
(tests/fault/scenarios/_ledger.py), so any mix-up is detectable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from ckptd_client import CheckpointManager, CkptdError, IntegrityError, Level, NotFound
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from tests.fault._node_state import NodeView, failed_drain, lasting_temps, settle, tier_text, tiers_now
from tests.fault.scenarios._ledger import Ledger, Save, leaves, same
from tests.state_factory import blank_like

__all__ = ["CHECKS", "Checker", "Expect", "Ledger", "NodeView", "Report", "Save", "Store", "check"]

CLEAR_ERRORS = (IntegrityError, NotFound)  # how a destroyed copy must be reported
SHM_SETTLE_S = 5.0  # the pool and its slot files agree within this once nothing is in flight


# -- what a scenario tells the checker -------------------------------------------------------
@dataclass
class Expect:
    """What the fault may destroy, and what must hold afterwards."""

    # (step, rank) or (step, rank, node): no valid copy is left (on that node)
    unrecoverable: frozenset[tuple[Any, ...]] = frozenset()
    # (step, rank) or (step, rank, node) whose only copies may be damaged: exact bytes or a clear error
    degraded: frozenset[tuple[Any, ...]] = frozenset()
    # (step, rank) -> the tier that must serve its first restore in this check
    served: dict[tuple[int, int], str] = field(default_factory=dict)
    down: frozenset[str] = frozenset()  # nodes that are down on purpose
    recovered: frozenset[str] = frozenset()  # nodes restarted since the fault (recovery has run)
    store_reachable: bool = True  # False while the nodes cannot reach the store: no upload can be cleaned
    disk_writable: bool = True  # False while the disk is read-only: no temp file can be cleaned


@dataclass
class Store:
    client: Any
    bucket: str
    prefix: str


@dataclass
class Report:
    phase: str
    failures: dict[str, list[str]] = field(default_factory=dict)
    lost: int = 0
    partial: int = 0
    corrupt: int = 0
    served: dict[str, int] = field(default_factory=dict)
    settled: bool = True

    def fail(self, check: str, msg: str) -> None:
        self.failures.setdefault(check, []).append(msg)

    @property
    def ok(self) -> bool:
        return not self.failures and not (self.lost or self.partial or self.corrupt)


# how many newer committed steps a tier keeps before retention may remove an acknowledged one:
# the newest step in memory and the newest replica are protected; disk and object keep 3 (default)
RETAINED = {Level.STAGED: 1, Level.REPLICATED: 1, Level.LOCAL_DURABLE: 3, Level.PERSISTED: 3}
CHECKS = ("acked", "committed", "corruption", "serving", "leaks", "deadline")


def _survives(level: Level, home: str, nodes: list[str], lost: frozenset[str]) -> bool:
    gone = {n for n in nodes if f"node@{n}" in lost}
    if level == Level.PERSISTED:
        return "store" not in lost
    if level == Level.STAGED:  # survives a trainer crash; not a daemon crash (DESIGN.md section 2)
        return home not in gone and not {f"memory@{home}", f"daemon@{home}"} & lost
    if level == Level.LOCAL_DURABLE:
        return home not in gone and f"disk@{home}" not in lost
    own = home not in gone and not {f"memory@{home}", f"disk@{home}"} <= lost
    return own or any(n != home and n not in gone and f"memory@{n}" not in lost for n in nodes)


Client = Callable[[int, NodeView], CheckpointManager]  # (rank, node) -> a client of that node


class Checker:
    def __init__(self, ledger: Ledger, nodes: list[NodeView], store: Store | None,
                 reader: Callable[[], NodeView] | None, client: Client) -> None:
        self.client = client
        self.ledger = ledger
        self.nodes = nodes
        self.store = store
        self.reader = reader
        self.restored: set[tuple[int, int]] = set()

    def home(self, rank: int) -> NodeView:
        return next(n for n in self.nodes if not n.ranks or rank in n.ranks)

    def restore(self, node: NodeView, step: int, rank: int, rep: Report, where: str, exp: Expect) -> bool:
        """Restore (step, rank) on node into a blank state and judge it; True when it passed."""
        led = self.ledger
        keys = {(step, rank), (step, rank, node.name)}
        expect_error, may_fail = bool(keys & exp.unrecoverable), bool(keys & exp.degraded)
        need_tier = exp.served.get((step, rank)) if (step, rank) not in self.restored else None
        self.restored.add((step, rank))
        want = led.state(step, rank)
        state = blank_like(want)
        m = self.client(rank, node)
        try:
            got_step = m.restore(state, step=step)
        except CLEAR_ERRORS as exc:
            if expect_error or may_fail:
                return True
            rep.fail(where, f"{step}/{rank} on {node.name}: {type(exc).__name__}: {exc}"
                            f"{tiers_now(node, led.job, step)}")
            return False
        except CkptdError as exc:
            rep.fail(where, f"{step}/{rank} on {node.name}: unclear error {type(exc).__name__}: {exc}")
            return False
        served = m.last_restore.served_from if m.last_restore else "?"
        rep.served[served] = rep.served.get(served, 0) + 1
        verdict = self.judge(state, step, rank)
        if got_step != step or verdict != "exact":
            rep.corrupt += verdict == "corrupt" or got_step != step
            rep.partial += verdict == "mixed"
            rep.fail("corruption", f"{step}/{rank} on {node.name} served from {served}: {verdict} "
                                   f"(restored step {got_step})")
            return False
        if expect_error:
            rep.fail("corruption", f"{step}/{rank} on {node.name}: served from {served} although no "
                                   "valid copy should be left (the checker's expectation or the fault is wrong)")
            return False
        if need_tier is not None and served != need_tier:
            rep.fail(where, f"{step}/{rank} on {node.name}: served from {served}, expected {need_tier}")
            return False
        return True

    def judge(self, got: Any, step: int, rank: int) -> str:
        """'exact' (one variant saved for (step, rank)), 'mixed' (parts of other saves), 'corrupt'."""
        led = self.ledger
        got_leaves = leaves(got)
        for variant in sorted(led.attempted(step, rank)) or [0]:
            want = leaves(led.state(step, rank, variant))
            if all(same(got_leaves[k], w) for k, w in want.items()):
                return "exact"
        others = [leaves(led.state(s.step, s.rank, s.variant)) for s in led.saves]
        if others and all(any(same(v, o[k]) for o in others) for k, v in got_leaves.items()):
            return "mixed"
        return "corrupt"

    # -- the checks ------------------------------------------------------------------------
    def check_acked(self, exp: Expect, rep: Report) -> None:
        led, names = self.ledger, [n.name for n in self.nodes]
        done: set[tuple[str, int, int]] = set()
        for level in Level:
            for rank in range(led.world_size):
                acked = led.newest_acked(level, rank)
                if acked is None:
                    continue
                step, epoch = acked
                home = self.home(rank)
                if not _survives(level, home.name, names, led.lost_since(epoch)):
                    continue
                if level == Level.PERSISTED and self.reader is not None:
                    node = self.reader()
                elif home.alive() and home.name not in exp.down:
                    node = home
                else:
                    continue  # the rank's node is down on purpose; checked once it is back
                if (node.name, step, rank) in done or self.newer_committed(level, node, step) >= RETAINED[level]:
                    continue  # retention may have removed it: the newer steps are checked as listed
                done.add((node.name, step, rank))
                if not self.restore(node, step, rank, rep, "acked", exp):
                    rep.lost += 1

    def newer_committed(self, level: Level, node: NodeView, step: int) -> int:
        """How many steps newer than ``step`` the node (the store, for PERSISTED) lists as committed."""
        if level == Level.PERSISTED and self.store is not None:
            s = self.store
            objs = s.client.list_objects_v2(Bucket=s.bucket, Prefix=f"{s.prefix}/{self.ledger.job}/")
            objs = objs.get("Contents", [])
            steps = [int(o["Key"].rsplit("/", 2)[-2].removeprefix("step-")) for o in objs
                     if o["Key"].endswith("/manifest.json")]
        else:
            with grpc.insecure_channel(f"unix:{node.addr}") as ch:
                try:
                    resp = pb_grpc.CheckpointServiceStub(ch).ListSteps(pb.ListStepsRequest(job=self.ledger.job),
                                                                       timeout=15)
                except grpc.RpcError:
                    return 0
            steps = [x.step for x in resp.steps if x.committed]
        return sum(1 for x in steps if x > step)

    def committed_lists(self, exp: Expect, rep: Report) -> list[tuple[NodeView, int, str]]:
        """(node, step, its tiers as listed) for every step a live node lists as committed."""
        out = []
        for node in self.nodes:
            if node.name in exp.down or not node.alive():
                continue
            with grpc.insecure_channel(f"unix:{node.addr}") as ch:
                try:
                    resp = pb_grpc.CheckpointServiceStub(ch).ListSteps(
                        pb.ListStepsRequest(job=self.ledger.job), timeout=15)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        rep.fail("serving", f"ListSteps on {node.name}: {err}")
                    continue
            out += [(node, s.step, tier_text(s.tiers)) for s in resp.steps if s.committed]
        return out

    def check_committed(self, exp: Expect, rep: Report) -> None:
        led = self.ledger
        for node, step, tiers in self.committed_lists(exp, rep):
            for rank in node.ranks or range(led.world_size):
                if not led.attempted(step, rank):
                    rep.partial += 1
                    rep.fail("committed", f"{node.name} lists step {step} committed, rank {rank} never saved it")
                    continue
                n = len(rep.failures.get("committed", []))
                if not self.restore(node, step, rank, rep, "committed", exp):
                    rep.partial += 1
                    if "=COMMITTED" not in tiers and len(rep.failures.get("committed", [])) > n:
                        rep.failures["committed"][-1] += f" -- listed committed while no tier holds it [{tiers}]"
        if self.store is None or self.reader is None:
            return
        s = self.store
        listed = s.client.list_objects_v2(Bucket=s.bucket, Prefix=f"{s.prefix}/{led.job}/").get("Contents", [])
        for key in sorted(o["Key"] for o in listed if o["Key"].endswith("/manifest.json")):
            step = int(key.rsplit("/", 2)[-2].removeprefix("step-"))
            for rank in range(led.world_size):
                if not self.restore(self.reader(), step, rank, rep, "committed", exp):
                    rep.partial += 1

    def check_serving(self, exp: Expect, rep: Report) -> None:
        for node in self.nodes:
            if node.name in exp.down:
                continue
            if not node.alive():
                rep.fail("serving", f"{node.name} is not running")
                continue
            with grpc.insecure_channel(f"unix:{node.addr}") as ch:
                try:
                    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                except grpc.RpcError as err:
                    rep.fail("serving", f"{node.name} health: {err}")
                    continue
                if resp.status != health_pb2.HealthCheckResponse.SERVING:
                    rep.fail("serving", f"{node.name} health status {resp.status}")

    def check_leaks(self, exp: Expect, rep: Report) -> None:
        """Temp files that outlive the daemon's work (a disk write in progress, e.g. the re-warm of
        a step restored from a peer, has one for a moment), uncommitted step dirs after recovery,
        stray shm files, unfinished multipart uploads."""
        for node in self.nodes:
            if node.name in exp.down or not node.alive():
                continue
            job_dir = node.data_dir / self.ledger.job
            for p in lasting_temps(job_dir) if job_dir.exists() and exp.disk_writable else []:
                rep.fail("leaks", f"{node.name}: temp file left: {p}")
            if node.name in exp.recovered and job_dir.exists():
                for p in sorted(job_dir.iterdir()):
                    if p.is_dir() and not (p / "manifest.json").exists() and not failed_drain(node, p):
                        rep.fail("leaks", f"{node.name}: uncommitted step dir survived recovery: {p}")
            self._check_shm(node, rep)
        if self.store is not None and exp.store_reachable:
            s = self.store
            ups = s.client.list_multipart_uploads(Bucket=s.bucket, Prefix=f"{s.prefix}/{self.ledger.job}/")
            for u in ups.get("Uploads", []):
                rep.fail("leaks", f"multipart upload left unfinished: {u['Key']} ({u['UploadId'][:12]})")

    def _check_shm(self, node: NodeView, rep: Report) -> None:
        deadline = time.monotonic() + SHM_SETTLE_S
        while True:  # a lease release sent without waiting, or a spare being made, lands within moments
            with grpc.insecure_channel(f"unix:{node.addr}") as ch:
                status = pb_grpc.CheckpointServiceStub(ch).DaemonStatus(pb.DaemonStatusRequest(), timeout=10)
            files = sorted(node.shm_dir.iterdir()) if node.shm_dir.exists() else []
            bins = [p for p in files if p.name.startswith("slot-") and p.name.endswith(".bin")]
            if len(bins) == status.slots or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        strangers = [p.name for p in files if p not in bins and not
                     (p.name.endswith(".meta.json") and p.with_name(p.name[:-10] + ".bin").exists())]
        if strangers:
            rep.fail("leaks", f"{node.name}: files in shm the pool does not own: {strangers}")
        if len(bins) != status.slots:
            rep.fail("leaks", f"{node.name}: {len(bins)} slot files in shm, the pool has {status.slots}")
        maps = Path(f"/proc/{node.pid()}/maps").read_text() if node.alive() else ""
        dead = sorted({line.split()[-2] for line in maps.splitlines()
                       if str(node.shm_dir) in line and line.endswith("(deleted)")})
        if dead:
            rep.fail("leaks", f"{node.name}: the daemon still maps {len(dead)} removed slot file(s) "
                              f"(shm memory outside the pool): {[Path(p).name for p in dead]}")
        size = sum(p.stat().st_size for p in bins)
        if size > node.budget_bytes or status.slot_bytes_in_use > node.budget_bytes:
            rep.fail("leaks", f"{node.name}: {size} bytes of slots over the budget of {node.budget_bytes}")

    def check_deadline(self, rep: Report) -> None:
        for s in self.ledger.saves:
            if s.seconds > self.ledger.deadline_s:
                rep.fail("deadline", f"save of {s.step}/{s.rank} blocked {s.seconds:.2f}s "
                                     f"(deadline {self.ledger.deadline_s:.1f}s)")


def check(ledger: Ledger, nodes: list[NodeView], exp: Expect, phase: str, client: Client,
          store: Store | None = None, reader: Callable[[], NodeView] | None = None) -> Report:
    """Run every invariant once the daemons settled; the Report lists each failure by check."""
    rep = Report(phase)
    rep.settled = settle(ledger.job, nodes, exp.down)
    c = Checker(ledger, nodes, store, reader, client)
    c.check_serving(exp, rep)
    c.check_acked(exp, rep)
    c.check_committed(exp, rep)
    c.check_leaks(exp, rep)
    c.check_deadline(rep)
    return rep
