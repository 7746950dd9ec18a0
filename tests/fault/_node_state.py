"""What a node's daemon says of a job's steps, asked over its socket, for the fault checker
(tests/fault/invariants.py): ``NodeView``, the checker's view of a node; ``tier_text`` /
``tiers_now``, the tier states of a step as text (for failure messages); ``failed_drain``, whether
a manifest-less step directory belongs to a drain that failed or is under way; ``settle``, waiting
until no daemon has tier work in flight; ``lasting_temps``, the ``.tmp-*`` files that do not go.
Nothing here judges: the checker does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc

IN_FLIGHT = (1, 2)  # TierState PENDING, IN_PROGRESS


class NodeView(Protocol):
    name: str
    addr: str
    ranks: tuple[int, ...]  # () = every rank (a one-node job)
    data_dir: Path
    shm_dir: Path
    budget_bytes: int

    def alive(self) -> bool: ...

    def pid(self) -> int: ...


TIER_STATES = {1: "PENDING", 2: "IN_PROGRESS", 3: "COMMITTED", 4: "FAILED", 5: "SKIPPED", 6: "REMOVED"}


def tier_text(tiers: Iterable[Any]) -> str:
    return ", ".join(f"{t.tier}={TIER_STATES.get(t.state, t.state)}" + (f" ({t.message[:60]})" if t.message else "")
                     for t in tiers)


def step_status(node: NodeView, job: str, step: int) -> Any:
    """GetStepStatus of the step on the node, or the RpcError it answered."""
    with grpc.insecure_channel(f"unix:{node.addr}") as ch:
        try:
            return pb_grpc.CheckpointServiceStub(ch).GetStepStatus(
                pb.GetStepStatusRequest(job=job, step=step), timeout=10)
        except grpc.RpcError as err:
            return err


def tiers_now(node: NodeView, job: str, step: int) -> str:
    """' [memory=REMOVED (slots reused), disk=SKIPPED (...)]': what the node says of the step now."""
    st = step_status(node, job, step)
    return f" [{st.details()}]" if isinstance(st, grpc.RpcError) else f" [{tier_text(st.tiers)}]"


def failed_drain(node: NodeView, step_dir: Path) -> bool:
    """A manifest-less step dir is not a recovery leftover if it holds a drain that failed after
    the restart (its files stay until the next recovery; the failure is reported) or one in flight."""
    st = step_status(node, step_dir.parent.name, int(step_dir.name.removeprefix("step-")))
    return not isinstance(st, grpc.RpcError) and any(t.tier == "disk" and t.state in (2, 4) for t in st.tiers)


def settle(job: str, nodes: list[NodeView], down: frozenset[str], timeout_s: float = 20.0) -> bool:
    """Wait until no daemon has tier work in flight for the job; False if it did not settle."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = False
        for node in nodes:
            if node.name in down or not node.alive():
                continue
            with grpc.insecure_channel(f"unix:{node.addr}") as ch:
                try:
                    resp = pb_grpc.CheckpointServiceStub(ch).ListSteps(pb.ListStepsRequest(job=job), timeout=10)
                except grpc.RpcError:
                    continue
            for s in resp.steps:
                states = {t.tier: t.state for t in s.tiers}
                if states.get("memory") == 3 and any(v in IN_FLIGHT for t, v in states.items() if t != "memory"):
                    busy = True
                elif any(v == 2 for t, v in states.items() if t != "memory"):  # a partial step stays 2
                    busy = True
        if not busy:
            return True
        time.sleep(0.2)
    return False


TEMP_SETTLE_S = 5.0  # how long a temp file may take to go: a disk write under way when the check starts


def lasting_temps(job_dir: Path) -> list[Path]:
    """The ``.tmp-*`` entries under job_dir still there after TEMP_SETTLE_S (or [] once none is)."""
    deadline = time.monotonic() + TEMP_SETTLE_S
    while True:
        temps = sorted(job_dir.glob("**/.tmp-*"))
        if not temps or time.monotonic() > deadline:
            return temps
        time.sleep(0.1)
