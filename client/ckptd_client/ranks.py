"""Where this process sits in its job: rank and world size, and the ranks on this node.

From an initialized torch.distributed group when there is one, else torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); torch is imported only if present.
"""

from __future__ import annotations

import os


def default_rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist  # only when torch is present
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def default_node_ranks(rank: int, world_size: int) -> tuple[int, ...]:
    """The ranks on this node, from torchrun's LOCAL_RANK/LOCAL_WORLD_SIZE (contiguous blocks)."""
    try:
        local_rank = int(os.environ["LOCAL_RANK"])
        local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return ()
    first = rank - local_rank
    if local_world >= world_size or not 0 <= local_rank < local_world or first < 0 \
            or first + local_world > world_size:
        return ()
    return tuple(range(first, first + local_world))
