"""``CheckpointManager`` with DTensors: the state goes through DCP's planners and the ckptd plugin.

A state holding ``DTensor``s (FSDP2, tensor parallel) cannot be flattened rank by rank: a DTensor's
local shard means nothing without its placement and global shape, and replicated tensors should be
stored once. So ``save`` and ``restore`` hand such a state to ``dcp.save`` / ``dcp.load`` with
``CkptdStorageWriter`` / ``CkptdStorageReader`` over the same manager: one storage path, the same
shards, the same metadata record, whichever door the state came through. Both are collective (every
rank of the mesh calls them).

Strictness maps onto DCP: strict restore loads with ``DefaultLoadPlanner(allow_partial_load=False)``
(a key the checkpoint lacks is an error naming it; keys the state lacks are never added) and the
reader refuses a dtype difference unless ``convert_dtype``; a shape difference is DCP's error.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ckptd_client.dcp.reader import CkptdStorageReader
from ckptd_client.dcp.writer import CkptdStorageWriter
from ckptd_client.handles import SaveHandle
from ckptd_client.manager_base import ManagerBase
from ckptd_client.restore.strict import Strictness


def _unwrapped(exc: CheckpointException, rank: int) -> BaseException:
    """The typed error DCP wrapped (this rank's if it failed, else the first failure)."""
    failures = exc.failures
    got = failures.get(rank) or next(iter(failures.values()), None)
    inner = got[0] if isinstance(got, tuple) else got
    return inner if isinstance(inner, BaseException) else exc


def save_via_dcp(manager: ManagerBase, step: int, state: Any) -> SaveHandle:
    writer = CkptdStorageWriter(manager=manager, step=step, wait_level=None)  # save()'s contract: staged
    try:
        dcp_save(state, storage_writer=writer)
    except CheckpointException as exc:
        raise _unwrapped(exc, manager.rank) from exc
    assert writer.handle is not None
    return writer.handle


def restore_via_dcp(manager: ManagerBase, state: Any, step: int | str, strictness: Strictness) -> int | None:
    reader = CkptdStorageReader(manager=manager, step=step, strictness=strictness)
    if step == "latest":
        newest = reader.newest_step()  # collective: every rank takes the same step
        if newest < 0:
            return None
        reader.step = newest
    try:
        dcp_load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=not strictness.strict))
    except CheckpointException as exc:
        raise _unwrapped(exc, manager.rank) from exc
    return reader.loaded_step
