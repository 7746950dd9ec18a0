"""Render the results JSON of the fault scenarios as the markdown table of docs/reliability.md.

    python -m tests.fault.run --all --seeds 1-5 --json fault-results.json
    python scripts/reliability_table.py fault-results.json                 # print the table
    python scripts/reliability_table.py fault-results.json --update docs/reliability.md

One row per scenario: runs and seeds, outcome (passed, expected failures of a known ckptd bug,
failed), the summed counts of lost checkpoints, partial steps reported committed and corruption
returned as success, the tiers that served the checker's restores, the levels the saves reached,
and the mean time of a run. ``--update`` replaces the text between the ``<!-- results:begin -->``
and ``<!-- results:end -->`` markers of the given file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
LEVELS = ("STAGED", "REPLICATED", "LOCAL_DURABLE", "PERSISTED")


def _seeds(seeds: list[int]) -> str:
    seeds = sorted(set(seeds))
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def table(results: dict[str, Any]) -> str:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in results["runs"]:
        rows[run["scenario"]].append(run)
    out = ["| scenario | runs (seeds) | outcome | lost | partial committed | corrupt as success "
           "| restores served by | levels reached | s/run |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in sorted(rows):
        runs = rows[name]
        passed = sum(1 for r in runs if r["ok"])
        skipped = [r for r in runs if r["skipped"]]
        known = sorted({r.get("known_bug", "") for r in runs if not r["ok"] and r.get("known_bug")})
        failed = len(runs) - passed - len(skipped) - sum(1 for r in runs if not r["ok"] and r.get("known_bug"))
        outcome = [f"{passed}/{len(runs)} pass"]
        if known:
            outcome.append(f"{len(runs) - passed - len(skipped) - failed} known bug ({', '.join(known)})")
        if skipped:
            outcome.append(f"{len(skipped)} skipped ({skipped[0]['skipped']})")
        if failed:
            outcome.append(f"**{failed} FAILED**")
        served: dict[str, int] = defaultdict(int)
        for r in runs:
            for tier, n in r["served"].items():
                served[tier] += n
        levels = {lv for r in runs for lv in r["levels"]}
        out.append("| `{}` | {} ({}) | {} | {} | {} | {} | {} | {} | {:.1f} |".format(
            name, len(runs), _seeds([r["seed"] for r in runs]), "; ".join(outcome),
            sum(r["lost"] for r in runs), sum(r["partial"] for r in runs), sum(r["corrupt"] for r in runs),
            ", ".join(f"{t} {n}" for t, n in sorted(served.items(), key=lambda kv: -kv[1])) or "-",
            ", ".join(lv for lv in LEVELS if lv in levels) or "-",
            sum(r["seconds"] for r in runs) / len(runs)))
    total = results["runs"]
    out.append("")
    out.append(f"{len(total)} runs of {len(rows)} scenarios; lost {sum(r['lost'] for r in total)}, "
               f"partial committed {sum(r['partial'] for r in total)}, "
               f"corrupt as success {sum(r['corrupt'] for r in total)}.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="JSON written by python -m tests.fault.run --json")
    ap.add_argument("--update", type=Path, help="replace the results section of this markdown file")
    ns = ap.parse_args(argv)
    text = table(json.loads(ns.results.read_text()))
    if ns.update is None:
        print(text)
        return 0
    doc = ns.update.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{ns.update}: no {BEGIN} ... {END} section", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    ns.update.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
