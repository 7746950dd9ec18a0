"""What a committed step holds for this rank, read from its manifest without reading its bytes.

A framework's resume path often needs a state whose exact shape it does not know before loading
(Lightning's ``CheckpointIO.load_checkpoint`` returns a fresh dict; a fresh optimizer has no
state yet). ``saved_template`` builds that exact state from the manifest's typed tree: containers
and plain values as saved, and every tensor as an empty tensor (or array) of the saved shape and
dtype. ``CheckpointManager.restore`` then fills exactly those tensors in place, so the restore
asks for every key the step has and no other, under a strict or a lenient restore alike.

``saved_value`` reads one plain value of the tree (a trainer's JSON state, a step counter) with no
tensor read at all. Both take the step explicitly: the caller resolves "latest" once (agreed
across ranks) and restores that same step.
"""

from __future__ import annotations

from typing import Any

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import IntegrityError
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd_client.manager import CheckpointManager


def saved_shard(manager: CheckpointManager, step: int) -> ShardEntry:
    """This rank's shard entry in the manifest of ``step`` (NotFound if the step is not committed)."""
    resp = manager.conn.call(manager.conn.stub.GetManifest, pb.GetManifestRequest(job=manager.job, step=step))
    try:
        manifest = Manifest.from_json(resp.manifest_json)
    except ValueError as exc:
        raise IntegrityError(f"the manifest of {manager.job}@{step} is invalid: {exc}") from None
    if manifest.world_size != manager.world_size:
        raise IntegrityError(f"{manager.job}@{step} was saved by {manifest.world_size} ranks, "
                             f"this job has {manager.world_size}")
    return manifest.shard(manager.rank)


def _empty(kind: str, t: TensorEntry) -> Any:
    if kind == "t":
        import torch  # the step was saved with torch tensors

        return torch.empty(t.shape, dtype=getattr(torch, t.dtype))
    import numpy as np

    return np.empty(t.shape, dtype=t.dtype)


def build(node: dict[str, Any], tensors: tuple[TensorEntry, ...]) -> Any:
    """The state a tree node describes, tensors empty (see module docstring)."""
    ((kind, val),) = node.items()
    if kind in ("t", "a"):
        return _empty(kind, tensors[val])
    if kind == "v":
        return val
    if kind == "f":
        return float.fromhex(val)
    if kind == "d":
        return {k: build(child, tensors) for k, child in val}
    if kind == "l":
        return [build(child, tensors) for child in val]
    if kind == "u":
        return tuple(build(child, tensors) for child in val)
    if kind == "s":  # an object's state dict: restored as the plain dict it was saved as
        return build(val, tensors)
    raise IntegrityError(f"unknown tree node {kind!r}")


def saved_template(manager: CheckpointManager, step: int) -> Any:
    """The exact state ``step`` holds for this rank, with empty tensors, ready for ``restore``."""
    shard = saved_shard(manager, step)
    return build(shard.tree, shard.tensors)


def saved_value(shard: ShardEntry, key: str) -> Any:
    """The plain value under top-level ``key`` of a shard's tree (KeyError if absent or a tensor)."""
    node = shard.tree
    if "s" in node:
        node = node["s"]
    for k, child in node.get("d", []):
        if k == key:
            ((kind, val),) = child.items()
            if kind == "v":
                return val
            if kind == "f":
                return float.fromhex(val)
            raise KeyError(f"{key!r} holds a {kind!r} node, not a plain value")
    raise KeyError(key)
