"""Command-line runner of the seeded fault scenarios, and the soak outside CI.

    python -m tests.fault.run --list
    python -m tests.fault.run --scenario daemon_kill_mid_drain --seed 7
    python -m tests.fault.run --all --seeds 1-50 --json results.json

Runs each (scenario, seed) in one shared environment (one S3 server), prints one line per run
(PASS/FAIL/SKIP, the seed's choices, the counts of lost/partial/corrupt checkpoints, the levels
reached and the tiers that served restores), the failed checks of a failed run, and writes every
outcome to the JSON file (render it with scripts/reliability_table.py). Exit status 1 if any run
failed other than by a known open ckptd bug (tests/fault/scenarios/known_bugs.py). The same
(scenario, seed) makes the same choices.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.fault.scenarios import Outcome, load, run_one
from tests.fault.scenarios._env import Env
from tests.fault.scenarios.known_bugs import known_bug


def parse_seeds(text: str) -> list[int]:
    """"1,2,3" or "1-50" or "1-5,9"."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def run_many(names: list[str], seeds: list[int], workdir: Path, echo: Any = print) -> list[Outcome]:
    env = Env(workdir)
    outcomes = []
    try:
        for name in names:
            for seed in seeds:
                out = run_one(name, seed, env)
                bug = known_bug(out)
                echo(out.line() if out.ok or out.skipped else
                     out.failures() + (f"\n  known ckptd bug {bug.id}: {bug.title}" if bug else ""))
                outcomes.append(out)
    finally:
        env.close()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fault.run", description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--scenario", action="append", help="scenario name (repeatable)")
    what.add_argument("--all", action="store_true", help="every registered scenario")
    what.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--seed", type=int, action="append", help="one seed (repeatable)")
    ap.add_argument("--seeds", default="", help='seed list: "1,2,3", "1-50"')
    ap.add_argument("--json", type=Path, help="write the outcomes to this JSON file")
    ap.add_argument("--workdir", type=Path, help="keep run directories (logs of failed runs) here")
    ns = ap.parse_args(argv)
    registry = load()
    if ns.list:
        for sc in registry.values():
            print(f"{sc.name:32} {sc.doc}")
        return 0
    names = sorted(registry) if ns.all else ns.scenario
    unknown = [n for n in names if n not in registry]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; try --list")
    seeds = (ns.seed or []) + parse_seeds(ns.seeds)
    seeds = seeds or [1, 2, 3]
    workdir = ns.workdir or Path(tempfile.mkdtemp(prefix="ckptd-fault-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    outcomes = run_many(names, seeds, workdir)
    failed = [o for o in outcomes if not o.ok and not o.skipped and known_bug(o) is None]
    known = sum(1 for o in outcomes if not o.ok and known_bug(o) is not None)
    print(f"{len(outcomes)} runs, {len(failed)} failed, {known} failed by a known open ckptd bug, "
          f"{sum(1 for o in outcomes if o.skipped)} skipped, {time.monotonic() - t0:.0f}s; workdir {workdir}")
    if ns.json:
        runs = [{**o.to_json(), "known_bug": getattr(known_bug(o), "id", "")} for o in outcomes]
        ns.json.write_text(json.dumps({"seeds": seeds, "runs": runs}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
