"""Where this process sits in its job: rank and world size, and the ranks on this node.

From an initialized torch.distributed group when there is one, else torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); torch is imported only if present.
``join_peers`` gathers every rank's daemon identity through the job's process group.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import FailedPrecondition
from ckptd_client.rpc import Connection

log = logging.getLogger("ckptd_client")


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


def join_peers(conn: Connection, dist: Any, world_size: int) -> list[str]:
    """Membership from the job: gather every rank's daemon identity through the process group
    ``dist`` and hand the job's list to this rank's daemon (SetPeers). Collective: every rank
    calls it. A no-op when the daemon replicates nothing."""
    st = conn.call(conn.stub.DaemonStatus, pb.DaemonStatusRequest())
    mine = f"{st.node_id}={st.peer_address}" if st.node_id and st.peer_address else ""
    if mine and st.failure_domain:
        mine += f"@{st.failure_domain}"
    gathered: list[str | None] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    entries = sorted({e for e in gathered if e})
    if not mine or len(entries) < 2:
        return []
    try:
        return list(conn.call(conn.stub.SetPeers, pb.SetPeersRequest(peers=entries)).members)
    except FailedPrecondition as exc:  # static membership configured: the daemon keeps it
        log.debug("daemon keeps its own peer list: %s", exc)
        return []
