"""Layout <-> protobuf conversion for the client (the daemon has its own in ckptd.rpc.convert)."""

from __future__ import annotations

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.layout import TensorEntry


def layout_pb(tensors: list[TensorEntry], tree_json: str) -> pb.ShardLayout:
    return pb.ShardLayout(
        tensors=[pb.TensorMeta(name=t.name, dtype=t.dtype, shape=list(t.shape), offset=t.offset,
                               nbytes=t.nbytes) for t in tensors],
        tree_json=tree_json,
    )


def tensors_from_layout(layout: pb.ShardLayout) -> list[TensorEntry]:
    return [TensorEntry(t.name, t.dtype, tuple(t.shape), t.offset, t.nbytes) for t in layout.tensors]
