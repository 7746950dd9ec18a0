"""Conversions between protobuf messages and the daemon's Python types (one place, both ways)."""

from __future__ import annotations

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import InvalidArgument
from ckptd.core.layout import TensorEntry
from ckptd.core.types import Level, TierName
from ckptd.memory.catalog import StepState


def tensors_from_pb(layout: pb.ShardLayout) -> list[TensorEntry]:
    try:
        return [
            TensorEntry(t.name, t.dtype, tuple(int(d) for d in t.shape), int(t.offset), int(t.nbytes))
            for t in layout.tensors
        ]
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"bad tensor entry: {exc}") from None


def tensors_to_pb(tensors: tuple[TensorEntry, ...] | list[TensorEntry], tree_json: str) -> pb.ShardLayout:
    return pb.ShardLayout(
        tensors=[
            pb.TensorMeta(name=t.name, dtype=t.dtype, shape=list(t.shape), offset=t.offset, nbytes=t.nbytes)
            for t in tensors
        ],
        tree_json=tree_json,
    )


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
