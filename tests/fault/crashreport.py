"""What a crash enumeration found (crashsim.py simulates the crashes): ``Tally`` counts the crash
points, the states checked per flavour and the violations by kind, with up to ten examples;
``report`` prints its summary (past pytest's capture, so a CI log shows it) and merges it into
the JSON file named by ``CKPTD_RELIABILITY_OUT``, one key per enumeration."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fault.crashsim import Found


@dataclass
class Tally:
    crash_points: int = 0  # N: file mutations of the workload
    states: Counter[str] = field(default_factory=Counter)  # per flavour: k = 0..N each
    recovery_crash_points: int = 0  # second level: mutations of the recoveries recorded
    recovery_states: Counter[str] = field(default_factory=Counter)
    distinct_states: int = 0
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    op_kinds: Counter[str] = field(default_factory=Counter)
    model_mismatches: list[int] = field(default_factory=list)

    def add(self, found: Found, where: str) -> None:
        for kind, what in found:
            self.violations[kind] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{where}: {kind}: {what}")

    def summary(self) -> dict[str, Any]:
        kinds = ("lost", "partial", "corrupt", "recovery", "resave")
        return {"crash_points": self.crash_points, "states_checked": dict(self.states),
                "recovery_crash_points": self.recovery_crash_points,
                "recovery_states_checked": dict(self.recovery_states), "distinct_states": self.distinct_states,
                "violations": {k: self.violations[k] for k in kinds} | {"model": len(self.model_mismatches)}}


def report(name: str, summary: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    line = f"{name}: {json.dumps(summary, sort_keys=True)}"
    with capsys.disabled():
        print(f"\n{line}")
    out = os.environ.get("CKPTD_RELIABILITY_OUT")
    if out:
        path = Path(out)
        data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
        data[name] = summary
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return line
