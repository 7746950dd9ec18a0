"""The context one scenario run works through: seeded choices, nodes, saves, acks, checks.

``Ctx`` owns the run's random generator (seeded by scenario name and seed: every choice a
scenario makes goes through ``choose``/``randint``/``uniform``/``cycle`` and is recorded in
``params``), its job name, its ledger (tests/fault/scenarios/_ledger.py), the nodes it started and
the client managers it opened. ``save`` times every save() call for the deadline check; ``ack``
waits for a level and records it only when the daemon confirmed it; ``fault`` opens a new epoch
and names what the fault destroyed; ``check`` runs the invariant checker and keeps its report.
"""

from __future__ import annotations

import random
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ckptd_client import (
    AlreadyExists,
    BudgetExhausted,
    CheckpointManager,
    CkptdError,
    FailedPrecondition,
    InvalidArgument,
    Level,
    SaveHandle,
)

from tests.fault.invariants import Expect, Ledger, Report, check
from tests.fault.scenarios._env import SAVE_DEADLINE_S, WAIT_TIMEOUT_S, Env, Node

KiB = 1024
GLOBAL_LEVELS = (Level.REPLICATED, Level.PERSISTED)  # reported for the whole step by every node
REFUSALS = (AlreadyExists, BudgetExhausted, FailedPrecondition, InvalidArgument)  # nothing was written


class Ctx:
    def __init__(self, env: Env, name: str, seed: int, workdir: Path, world_size: int = 2,
                 nbytes: int = 192 * KiB) -> None:
        self.env = env
        self.name = name
        self.seed = seed
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(f"{name}:{seed}")
        self.job = f"{name.replace('_', '-')}-{seed}-{uuid.uuid4().hex[:6]}"
        self.ledger = Ledger(seed, self.job, world_size, nbytes, SAVE_DEADLINE_S)
        self.nodes: list[Node] = []
        self.params: dict[str, Any] = {}
        self.story: list[str] = []
        self.notes: list[str] = []
        self.reports: list[Report] = []
        self.uses_store = False
        self.mounts: list[Path] = []
        self.check_s = 0.0  # time spent in the checker
        self._managers: dict[tuple[str, int], CheckpointManager] = {}

    # -- seeded choices -----------------------------------------------------------------------
    def choose(self, key: str, options: Iterable[Any]) -> Any:
        v = self.rng.choice(list(options))
        self.params[key] = v
        return v

    def cycle(self, key: str, options: Iterable[Any]) -> Any:
        """A choice that walks the options with the seed, so seeds 1..n cover every one of n."""
        opts = list(options)
        v = opts[(self.seed - 1) % len(opts)]
        self.params[key] = v
        return v

    def randint(self, key: str, lo: int, hi: int) -> int:
        v = self.rng.randint(lo, hi)
        self.params[key] = v
        return v

    def uniform(self, key: str, lo: float, hi: float) -> float:
        v = round(self.rng.uniform(lo, hi), 3)
        self.params[key] = v
        return v

    def say(self, text: str) -> None:
        self.story.append(text)

    # -- nodes and clients ------------------------------------------------------------------
    def node(self, name: str = "n1", **kw: Any) -> Node:
        if kw.get("object"):
            self.uses_store = True
        n = self.env.node(name, self.dir, **kw)
        self.nodes.append(n)
        return n

    def cluster(self, names: tuple[str, ...] = ("n1", "n2"), **kw: Any) -> list[Node]:
        if kw.get("object"):
            self.uses_store = True
        nodes = self.env.cluster(self.dir, names, self.ledger.world_size, **kw)
        self.nodes += nodes
        return nodes

    def home(self, rank: int) -> Node:
        return next(n for n in self.nodes if not n.ranks or rank in n.ranks)

    def manager(self, rank: int, node: Any = None) -> CheckpointManager:
        node = node or self.home(rank)
        key = (node.addr, rank)
        m = self._managers.get(key)
        if m is None:
            m = self._managers[key] = CheckpointManager(
                self.job, rank=rank, world_size=self.ledger.world_size, addr=node.addr,
                node_ranks=node.ranks or None, wait_timeout_s=WAIT_TIMEOUT_S, connect_timeout_s=10)
        return m

    def forget_managers(self, node: Node) -> None:
        for key in [k for k in self._managers if k[0] == node.addr]:
            _close_soon(self._managers.pop(key))

    # -- saves and acknowledgements ---------------------------------------------------------------
    def save(self, step: int, ranks: Iterable[int] | None = None, variant: int = 0) -> dict[int, SaveHandle]:
        """save() each rank's state through its home node; the ledger records it, timed."""
        out = {}
        for rank in range(self.ledger.world_size) if ranks is None else ranks:
            node = self.home(rank)
            m = self.manager(rank, node)
            t0 = time.perf_counter()
            h = m.save(step, self.ledger.state(step, rank, variant))
            self.record(step, rank, variant, node, h, time.perf_counter() - t0)
            out[rank] = h
        return out

    def record(self, step: int, rank: int, variant: int, node: Node, h: SaveHandle | None, seconds: float,
               error: str = "") -> None:
        """Record one save() call. save() returning ok is STAGED for that rank's shard, so once
        every rank's save of the step returned ok, the step counts as acknowledged STAGED."""
        from tests.fault.invariants import Save

        ok = h.ok if h is not None else not error
        refused = h is not None and (h.skipped or isinstance(h.error, REFUSALS))
        err = str(h.error or "") if h is not None else error
        self.ledger.saves.append(Save(step, rank, variant, node.name, ok, err, seconds, refused))
        if all(any(s.ok for s in self.ledger.saves if (s.step, s.rank) == (step, r))
               for r in range(self.ledger.world_size)) and (step, Level.STAGED) not in self.ledger.acks:
            self.ledger.ack(step, Level.STAGED, range(self.ledger.world_size))

    def ack(self, step: int, level: Level, node: Node | None = None, timeout_s: float = 30.0) -> str:
        """Wait for ``level`` of ``step`` as seen by node; record the ack. Returns '' or the error."""
        node = node or self.nodes[0]
        rank = node.ranks[0] if node.ranks else 0
        try:
            self.manager(rank, node)._wait(step, level, timeout_s)
        except CkptdError as exc:
            return f"{type(exc).__name__}: {exc}"
        # with peers, LOCAL_DURABLE is a commit across the job's nodes too (every rank's disk part)
        everyone = level in GLOBAL_LEVELS or not node.ranks or (level == Level.LOCAL_DURABLE and "peers" in node.config)
        self.ledger.ack(step, level, range(self.ledger.world_size) if everyone else node.ranks)
        return ""

    def must_ack(self, step: int, level: Level, node: Node | None = None, timeout_s: float = 30.0) -> None:
        err = self.ack(step, level, node, timeout_s)
        if err:
            raise AssertionError(f"step {step} did not reach {level.name}: {err}")

    def resume_replication(self, first: int, node: Node | None = None, tries: int = 4, gap_s: float = 1.0) -> int:
        """Save steps from ``first`` until one is REPLICATED (a peer that just came back may still
        be refused for the few seconds of the client's reconnect backoff; the next step tries the
        ring again). Returns the step that made it; fails after ``tries`` steps. Asked of ``node``
        (a node that did not restart learns of a degraded step at once)."""
        errors = []
        for step in range(first, first + tries):
            self.save(step)
            err = self.ack(step, Level.REPLICATED, node)
            if not err:
                if errors:
                    self.say(f"replication resumed at step {step} ({len(errors)} step(s) degraded first; "
                             f"the first: {errors[0]})")
                return step
            errors.append(err[-300:])
            time.sleep(gap_s)
        raise AssertionError(f"replication did not resume in {tries} steps: {errors}")

    def fault(self, what: str, *lost: str) -> None:
        """Mark the fault: a new epoch; ``lost`` names what it destroyed (excuses older acks only)."""
        self.ledger.fault(lost)
        self.say(what + (f" (lost: {', '.join(lost)})" if lost else ""))

    def restart(self, node: Node, **kw: Any) -> Node:
        self.forget_managers(node)
        return node.restart(**kw)

    def restore(self, rank: int, step: int | str = "latest", node: Node | None = None) -> tuple[int | None, str]:
        """Restore rank as a resuming trainer would; assert the bytes; return (step, served tier)."""
        from tests.fault.invariants import Checker
        from tests.state_factory import blank_like

        m = self.manager(rank, node)
        state = blank_like(self.ledger.state(1, rank))
        got = m.restore(state, step=step)
        if got is None:
            return None, ""
        verdict = Checker(self.ledger, [], None, None, self.manager).judge(state, got, rank)
        assert verdict == "exact", f"resume of rank {rank} from step {got}: {verdict} bytes"
        return got, m.last_restore.served_from if m.last_restore else "?"

    def tier_state(self, step: int, tier: str, node: Node | None = None) -> int:
        """The step's TierState value at ``tier`` on node (0 when the daemon does not know the step)."""
        import grpc

        from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
        from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc

        node = node or self.nodes[0]
        with grpc.insecure_channel(f"unix:{node.addr}") as ch:
            try:
                st = pb_grpc.CheckpointServiceStub(ch).GetStepStatus(
                    pb.GetStepStatusRequest(job=self.job, step=step), timeout=10)
            except grpc.RpcError:
                return 0
        return next((t.state for t in st.tiers if t.tier == tier), 0)

    def in_memory(self, step: int, node: Node | None = None) -> bool:
        return self.tier_state(step, "memory", node) == 3  # slots are reused: only the newest stay

    def saved_ok(self, step: int) -> bool:
        return all(s.ok for s in self.ledger.saves if s.step == step)

    # -- checks -----------------------------------------------------------------------------
    def check(self, phase: str, **expect: Any) -> Report:
        exp = Expect(**{k: frozenset(v) if isinstance(v, (set, list, tuple)) else v for k, v in expect.items()})
        store = self.env.store() if self.uses_store else None
        reader = self.env.reader if self.uses_store else None
        t0 = time.monotonic()
        rep = check(self.ledger, list(self.nodes), exp, phase, lambda r, n: self.manager(r, n), store, reader)
        self.check_s += time.monotonic() - t0
        self.reports.append(rep)
        return rep

    def flag(self, phase: str, check_name: str, msg: str) -> None:
        """A failure the scenario itself saw (the run goes on, so the later checks still run)."""
        rep = next((r for r in self.reports if r.phase == phase), None)
        if rep is None:
            rep = Report(phase)
            self.reports.append(rep)
        rep.fail(check_name, msg)

    def close(self) -> None:
        for m in self._managers.values():
            _close_soon(m)
        self._managers.clear()
        for n in self.nodes:
            n.kill()
            shutil.rmtree(n.shm_dir, ignore_errors=True)
        for path in self.mounts:
            self.env.umount(path)


def _close_soon(m: CheckpointManager) -> None:
    """Close a client off the scenario's thread: a gRPC channel close can take a fifth of a second."""
    import threading

    threading.Thread(target=m.close, name="close-client", daemon=True).start()
