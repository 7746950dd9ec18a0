"""Every seeded fault scenario (tests/fault/scenarios/) with every seed, checked by one invariant
checker (tests/fault/invariants.py); and the minimal reproduction of each ckptd bug they found.

Seeds come from ``CKPTD_FAULT_SEEDS`` ("1,2,3" by default; "1-50" for a soak). One environment
(one S3 server, one reader node) is shared by the module. Each run prints its line (the seed's
choices, the counts of lost/partial/corrupt checkpoints, levels, serving tiers); a failed run
fails with every failed check. A failed run whose failures are all one known ckptd bug's
(tests/fault/scenarios/known_bugs.py) is an expected failure naming that bug, unless
``CKPTD_FAULT_STRICT=1``. ``CKPTD_FAULT_RESULTS=path`` writes every outcome to a JSON file.
Reproduce one run with ``python -m tests.fault.run --scenario NAME --seed N``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault.run import parse_seeds
from tests.fault.scenarios import Outcome, Skip, load, run_one
from tests.fault.scenarios._env import Env
from tests.fault.scenarios.known_bugs import KNOWN_BUGS, KnownBug, known_bug

SEEDS = parse_seeds(os.environ.get("CKPTD_FAULT_SEEDS", "1,2,3"))
STRICT = os.environ.get("CKPTD_FAULT_STRICT", "") not in ("", "0")
RESULTS: list[Outcome] = []

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("fault-scenarios"))
    yield e
    e.close()
    path = os.environ.get("CKPTD_FAULT_RESULTS")
    if path:
        runs = [{**o.to_json(), "known_bug": getattr(known_bug(o), "id", "")} for o in RESULTS]
        Path(path).write_text(json.dumps({"seeds": SEEDS, "runs": runs}, indent=1) + "\n")


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("name", sorted(load()))
def test_scenario(env: Env, name: str, seed: int) -> None:
    out = run_one(name, seed, env)
    RESULTS.append(out)
    print(out.line())
    if out.skipped:
        pytest.skip(f"{name} seed {seed}: {out.skipped}")
    if not out.ok:
        bug = known_bug(out)
        if bug is not None and not STRICT:
            pytest.xfail(f"known ckptd bug {bug.id}: {bug.title} [{bug.where}] -- {out.line()}")
        pytest.fail(out.failures(), pytrace=False)
    assert out.checks and all(v == "ok" for v in out.checks.values())
    assert (out.lost, out.partial, out.corrupt) == (0, 0, 0)


@pytest.mark.parametrize("bug", [pytest.param(b, marks=() if b.fixed_in else pytest.mark.xfail(
    strict=True, raises=AssertionError, reason=f"ckptd bug {b.id}: {b.title} [{b.where}]")) for b in KNOWN_BUGS],
    ids=[b.id for b in KNOWN_BUGS])
def test_known_bug_reproduction(env: Env, bug: KnownBug) -> None:
    """A fixed bug's reproduction must pass (regression test). An open one fails (strict xfail);
    once it is fixed the xfail turns red: record the fixing commit in known_bugs.py."""
    try:
        bug.repro(env)
    except Skip as exc:
        pytest.skip(f"{bug.id}: {exc}")


def test_seed_choices_are_reproducible(env: Env) -> None:
    """The same (scenario, seed) makes the same choices; another seed makes others."""
    from tests.fault.scenarios._ctx import Ctx

    def choices(seed: int) -> list[object]:
        ctx = Ctx(env, "daemon_kill_mid_drain", seed, env.workdir / f"choices-{seed}")
        return [ctx.randint("a", 0, 10**9), ctx.uniform("b", 0, 1), ctx.choose("c", range(100)), ctx.cycle("d", "xyz")]

    assert choices(7) == choices(7)
    assert choices(7) != choices(8)
