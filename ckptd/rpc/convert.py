"""Conversions between protobuf messages and the daemon's step states and durability levels.

The shard layout's conversion, which the client shares, is ``ckptd.core.layout.layout_to_pb`` /
``tensors_from_pb``.
"""

from __future__ import annotations

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import InvalidArgument
from ckptd.core.types import Level, TierName
from ckptd.memory.catalog import StepState


def tier_statuses(st: StepState) -> list[pb.TierStatus]:
    out = []
    tiers = [TierName.MEMORY, TierName.DISK] + [t for t in (TierName.PEER, TierName.OBJECT) if t in st.tiers]
    for tier in tiers:
        state, msg = st.effective(tier)
        out.append(pb.TierStatus(tier=tier.value, state=int(state), message=msg))  # type: ignore[arg-type]
    return out


def step_status_to_pb(st: StepState) -> pb.StepStatus:
    level = st.level()
    if level is None and st.in_memory:
        level = Level.STAGED
    return pb.StepStatus(
        job=st.job,
        step=st.step,
        world_size=st.world_size,
        staged_ranks=sorted(r for r, rec in st.shards.items() if rec.checksummed),
        tiers=tier_statuses(st),
        level=int(level) if level is not None else 0,  # type: ignore[arg-type]
    )


def level_from_pb(value: int) -> Level:
    try:
        return Level(value)
    except ValueError:
        raise InvalidArgument(f"unknown durability level {value}") from None
