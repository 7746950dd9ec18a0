"""One rank of a multi-rank job, run as its own process by tests/integration/test_multirank.py.

    python tests/_multirank_worker.py save    --addr SOCK --job J --rank R --world-size W --steps 1,2,3 [--torch]
    python tests/_multirank_worker.py restore --addr SOCK --job J --rank R --world-size W --steps latest,1 [--torch]

Every (rank, step) has its own deterministic state (rank-dependent sizes, so shards differ).
``save`` saves each step and waits for LOCAL_DURABLE before the next. ``restore`` restores each
step into a fresh state (and ``latest`` in place into a zeroed template), compares it bit for bit
with the expected state and prints one JSON line; the exit status is 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from ckptd_client import CheckpointManager, Level  # noqa: E402

from tests.state_factory import rank_state  # noqa: E402


def same(a: Any, b: Any, path: str = "") -> str | None:
    """None when a and b are bit-identical values of the same types, else where they differ."""
    if type(a) is not type(b):
        return f"{path}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return f"{path}: array differs"
        return None
    if type(a).__module__.startswith("torch"):
        import torch

        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: tensor dtype/shape differs"
        ab = a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        bb = b.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return None if ab == bb else f"{path}: tensor bytes differ"
    if isinstance(a, float):
        return None if struct.pack("<d", a) == struct.pack("<d", b) else f"{path}: {a} != {b}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            if (err := same(a[k], b[k], f"{path}.{k}")) is not None:
                return err
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            if (err := same(x, y, f"{path}.{i}")) is not None:
                return err
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "restore"])
    p.add_argument("--addr", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--steps", required=True)
    p.add_argument("--torch", action="store_true")
    ns = p.parse_args()
    if ns.torch:
        import torch  # noqa: F401 - the state holds tensors

    out: dict[str, Any] = {"rank": ns.rank, "mode": ns.mode}
    errors: list[str] = []
    with CheckpointManager(ns.job, rank=ns.rank, world_size=ns.world_size, addr=ns.addr,
                           on_error="raise") as m:
        if ns.mode == "save":
            out["nbytes"] = {}
            for step in (int(s) for s in ns.steps.split(",")):
                h = m.save(step, rank_state(ns.rank, step, ns.torch))
                status = h.wait(Level.LOCAL_DURABLE, timeout_s=120)
                if int(status.level) != int(Level.LOCAL_DURABLE):
                    errors.append(f"step {step}: level {status.level}")
                out["nbytes"][step] = h.nbytes
        else:
            out["latest"] = m.latest_step()
            out["all_steps"] = m.all_steps()
            out["served_from"] = {}
            for spec in ns.steps.split(","):
                if spec == "latest":
                    step = int(out["latest"])
                    state = rank_state(ns.rank, step, ns.torch, zero=True)  # restored in place
                    got = m.restore(state)
                else:
                    step = int(spec)
                    state = {}
                    got = m.restore(state, step=step)
                if got != step:
                    errors.append(f"{spec}: restored step {got}, expected {step}")
                    continue
                err = same(rank_state(ns.rank, step, ns.torch), state, f"step {step}")
                if err is not None:
                    errors.append(err)
                assert m.last_restore is not None
                out["served_from"][spec] = m.last_restore.served_from
    out["errors"] = errors
    print(json.dumps(out))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
