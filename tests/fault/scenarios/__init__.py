"""Seeded fault scenarios for ckptd: a registry of scenario functions and the outcome of a run.

A scenario is a function ``fn(ctx)`` registered with ``@scenario``: it starts real daemons through
``ctx`` (tests/fault/scenarios/_ctx.py), saves per-step deterministic states, injects one kind of
fault with every choice (which failpoint hit, which byte, which rank, which timing) drawn from
``ctx.rng``, seeded by (scenario, seed), and calls ``ctx.check`` (tests/fault/invariants.py) after
every fault. ``run_one(name, seed, env)`` runs it and returns an ``Outcome``: the seed's choices,
what happened, the levels reached, which tiers served the restores, every check's verdict and the
counts of lost, partial and corrupt checkpoints. The same (scenario, seed) makes the same choices.

Scenario modules are imported on first use (``load``), so that the checker can import this
package without a cycle.
"""

from __future__ import annotations

import importlib
import shutil
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MODULES = ("crash", "disk", "corruption", "remote", "concurrency")


class Skip(Exception):
    """Raised by a scenario that cannot run here; the message says why (it is printed)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: Callable[[Any], None]
    module: str

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


REGISTRY: dict[str, Scenario] = {}


def scenario(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    REGISTRY[fn.__name__] = Scenario(fn.__name__, fn, fn.__module__.rsplit(".", 1)[-1])
    return fn


def load() -> dict[str, Scenario]:
    for mod in MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    return REGISTRY


@dataclass
class Outcome:
    scenario: str
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    levels: list[str] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)  # "phase:check" -> "ok" or the failures
    lost: int = 0
    partial: int = 0
    corrupt: int = 0
    seconds: float = 0.0
    check_s: float = 0.0  # of which in the checker
    error: str = ""
    skipped: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.error and not (self.lost or self.partial or self.corrupt)
                and all(v == "ok" for v in self.checks.values()) and bool(self.checks or self.skipped))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def line(self) -> str:
        verdict = "SKIP" if self.skipped else ("PASS" if self.ok else "FAIL")
        return (f"{verdict} scenario={self.scenario} seed={self.seed} params={self.params} "
                f"lost={self.lost} partial={self.partial} corrupt={self.corrupt} levels={','.join(self.levels)} "
                f"served={self.served} {self.seconds:.1f}s (checks {self.check_s:.1f}s) :: "
                f"{self.skipped or self.summary}")

    def failures(self) -> str:
        bad = [f"  {k}: {v}" for k, v in self.checks.items() if v != "ok"]
        return "\n".join([self.line(), *bad, *([f"  error: {self.error}"] if self.error else []),
                          *[f"  note: {n}" for n in self.notes]])


def run_one(name: str, seed: int, env: Any) -> Outcome:
    """Run scenario ``name`` with ``seed`` in ``env`` (tests/fault/scenarios/_env.py)."""
    from tests.fault.scenarios._ctx import Ctx

    sc = load()[name]
    workdir = env.workdir / f"{name}-{seed}-{uuid.uuid4().hex[:4]}"
    ctx = Ctx(env, name, seed, workdir)
    out = Outcome(name, seed)
    t0 = time.monotonic()
    try:
        sc.fn(ctx)
    except Skip as exc:
        out.skipped = str(exc)
    except Exception:  # noqa: BLE001 - a scenario that breaks is a failed outcome, with its traceback
        out.error = traceback.format_exc(limit=8)
    finally:
        ctx.close()
    out.seconds = time.monotonic() - t0
    out.params, out.summary, out.notes = ctx.params, "; ".join(ctx.story), ctx.notes
    out.levels = ctx.ledger.levels()
    out.check_s = round(ctx.check_s, 2)
    for rep in ctx.reports:
        out.lost += rep.lost
        out.partial += rep.partial
        out.corrupt += rep.corrupt
        if not rep.settled:
            out.notes.append(f"{rep.phase}: tier work still in flight after 20s; checked anyway")
        for tier, n in rep.served.items():
            out.served[tier] = out.served.get(tier, 0) + n
        from tests.fault.invariants import CHECKS

        for check in CHECKS:
            msgs = rep.failures.get(check, [])
            out.checks[f"{rep.phase}:{check}"] = "ok" if not msgs else " | ".join(msgs)
    if out.ok or out.skipped:
        shutil.rmtree(workdir, ignore_errors=True)
    return out
