"""What a scenario saved and what the daemons acknowledged: deterministic states and the ledger.

``Ledger.state(step, rank, variant)`` builds (tests/state_factory.py's ``ledger_state``) a numpy
state tree that differs for every (seed, step, rank, variant), so a restore that returns another
step's or rank's tensors, or a mix, is told apart from the right one (``same`` compares dtype,
shape and raw bytes). The ``Ledger`` records every save() call (variant, outcome, how long it
blocked) and every level a daemon confirmed, per step and rank, with the fault epoch it was
confirmed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ckptd_client import Level

from tests.state_factory import ledger_state


def leaves(state: Any, path: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        return {k2: v2 for k, v in state.items() for k2, v2 in leaves(v, f"{path}.{k}").items()}
    if isinstance(state, list):
        return {k2: v2 for i, v in enumerate(state) for k2, v2 in leaves(v, f"{path}[{i}]").items()}
    return {path: state}


def same(a: Any, b: Any) -> bool:
    if isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(b, float):
        return isinstance(a, float) and a.hex() == b.hex()
    return type(a) is type(b) and a == b


# -- the ledger of what was saved and acknowledged -------------------------------------------
@dataclass
class Save:
    step: int
    rank: int
    variant: int
    node: str
    ok: bool
    error: str
    seconds: float
    refused: bool = False  # refused before any byte was taken (AlreadyExists, skipped): never committed


@dataclass
class Ledger:
    """Every save, and every level the daemons confirmed. A fault opens a new epoch and names what
    it destroyed ("daemon@n1": a crash of that daemon, "memory@n1", "disk@n1", "node@n1": all of
    it, "store"); a loss only excuses acks made before it."""

    seed: int
    job: str
    world_size: int
    nbytes: int
    deadline_s: float
    saves: list[Save] = field(default_factory=list)
    acks: dict[tuple[int, Level], tuple[set[int], int]] = field(default_factory=dict)  # -> (ranks, epoch)
    epoch: int = 0
    losses: list[tuple[int, frozenset[str]]] = field(default_factory=list)

    def state(self, step: int, rank: int, variant: int = 0) -> dict[str, Any]:
        return ledger_state(self.seed, step, rank, variant, self.nbytes)

    def ack(self, step: int, level: Level, ranks: Iterable[int]) -> None:
        old = self.acks.get((step, level), (set(), 0))[0]
        self.acks[(step, level)] = (old | set(ranks), self.epoch)

    def fault(self, lost: Iterable[str] = ()) -> None:
        self.losses.append((self.epoch, frozenset(lost)))
        self.epoch += 1

    def lost_since(self, epoch: int) -> frozenset[str]:
        return frozenset(x for e, lost in self.losses if e >= epoch for x in lost)

    def attempted(self, step: int, rank: int) -> set[int]:
        """Variants of (step, rank) a daemon may hold: every save not refused outright."""
        return {s.variant for s in self.saves if (s.step, s.rank) == (step, rank) and not s.refused}

    def newest_acked(self, level: Level, rank: int) -> tuple[int, int] | None:
        got = [(s, e) for (s, lv), (ranks, e) in self.acks.items() if lv == level and rank in ranks]
        return max(got) if got else None

    def levels(self) -> list[str]:
        return sorted({lv.name for (_, lv) in self.acks}, key=lambda n: Level[n].value)
