"""What the demo concludes: the step the ranks restored, the bit-for-bit comparison, the JSON summary.

``restore_of`` checks that the restarted ranks all restored one step and says from which tiers;
``compare_runs`` compares the resumed run with the uninterrupted reference, rank by rank, by the
sha256 of every weight and optimizer-state tensor; ``summary`` is the JSON object the demo prints
as its last line (its keys are the demo's interface: README, docs and tests read them).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Any

from _demo_util import DemoError, say


@dataclass(frozen=True)
class Restore:
    """What the restarted trainers restored: one step, the tier that served each rank, how fast."""

    step: int
    tier_per_rank: list[str]
    ms_per_rank: list[float]

    @property
    def tiers(self) -> list[str]:
        return sorted(set(self.tier_per_rank))


def restore_of(resumed: list[dict[str, Any]]) -> Restore:
    """The restore every rank of the resumed run reported; DemoError if none, or not the same step."""
    restores = [r["restored"] for r in resumed]
    if any(r is None for r in restores):
        raise DemoError("the restarted trainers found no checkpoint to restore")
    restored_steps = {r["step"] for r in restores}
    if len(restored_steps) != 1:
        raise DemoError(f"ranks restored different steps: {sorted(restored_steps)}")
    restore = Restore(restored_steps.pop(), [r["served_from"] for r in restores],
                      [round(r["seconds"] * 1000, 3) for r in restores])
    say(f"restored step {restore.step} from {'/'.join(restore.tiers)} in {max(restore.ms_per_rank):.1f} ms "
        f"(per rank: {restore.ms_per_rank}; tier per rank: {restore.tier_per_rank})")
    return restore


def compare(ref: list[dict[str, Any]], run: list[dict[str, Any]], key: str) -> tuple[bool, list[str]]:
    """Whether every rank's tensors under ``key`` hash the same in both runs; names that differ."""
    diffs = []
    for r, (a, b) in enumerate(zip(ref, run)):
        if a[key].keys() != b[key].keys():
            diffs.append(f"rank {r}: different {key} tensors")
            continue
        diffs += [f"rank {r}: {name}" for name in a[key] if a[key][name] != b[key][name]]
    return not diffs, diffs


@dataclass(frozen=True)
class Comparison:
    """The resumed run against the reference: weights, optimizer state, and whether all ranks agree."""

    weights: bool
    optimizer: bool
    ranks_agree: bool

    @property
    def identical(self) -> bool:
        return self.weights and self.optimizer


def compare_runs(reference: list[dict[str, Any]], resumed: list[dict[str, Any]]) -> Comparison:
    """Compare, say what differs (at most 10 tensors) and the verdict."""
    weights_ok, weight_diffs = compare(reference, resumed, "weights")
    optim_ok, optim_diffs = compare(reference, resumed, "optimizer")
    ranks_agree = all(r["weights"] == resumed[0]["weights"] for r in resumed)
    for diff in (weight_diffs + optim_diffs)[:10]:
        say(f"  differs: {diff}")
    n_tensors = sum(len(r["weights"]) + len(r["optimizer"]) for r in resumed)
    say(f"compared {n_tensors} tensors (weights + optimizer state, all ranks): "
        f"{'bit-identical' if weights_ok and optim_ok else 'DIFFERENT'}")
    return Comparison(weights_ok, optim_ok, ranks_agree)


def summary(args: argparse.Namespace, job: str, completed: int, lost_node: str | None, stalls: list[float],
            restore: Restore, comparison: Comparison, resumed: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The demo's result: ``steps_lost`` is the highest step saved on every rank before the kill
    minus the step restored (steps training has to redo)."""
    tiers = restore.tiers
    return {
        "steps_lost": completed - restore.step,
        "identical": comparison.identical,
        "stall_ms_median": round(statistics.median(stalls) * 1000, 3) if stalls else None,
        "restore_ms": max(restore.ms_per_rank),
        "restored_from": tiers[0] if len(tiers) == 1 else "+".join(tiers),
        "restored_from_per_rank": restore.tier_per_rank,
        "nodes": args.nodes,
        "lost_node": lost_node,
        "steps": args.steps,
        "world_size": args.world_size,
        "kill_at": args.kill_at,
        "completed_before_kill": completed,
        "restored_step": restore.step,
        "bytes_per_rank": max(r["bytes"] for r in resumed),
        "saves": len(stalls),
        "restore_ms_per_rank": restore.ms_per_rank,
        "weights_identical": comparison.weights,
        "optimizer_identical": comparison.optimizer,
        "ranks_agree": comparison.ranks_agree,
        "final_loss": resumed[0]["final_loss"],
        "local_durable_step": min((r["local_durable_step"] or -1) for r in resumed),
        "seed": args.seed,
        "job": job,
        "seconds": round(seconds, 1),
    }
