"""ckptd_client: the training-side client of ckptd (and the ``ckptctl`` CLI).

    from ckptd_client import CheckpointManager, Level
    ckpt = CheckpointManager("my-job")               # rank/world_size from torch.distributed
    start = (ckpt.restore(state) or -1) + 1          # in place; None on a fresh start
    for step in range(start, steps):
        train_step()
        if ckpt.should_save(step):
            ckpt.save(step, state)                   # returns once bytes are in shared memory
    ckpt.wait_until_finished()                       # newest save on local disk

Light by design: imports grpc, numpy and the small shared modules of ``ckptd``; torch only if the
caller uses it; never boto3 or the daemon's tiers.
"""

from ckptd.core.errors import (
    AlreadyExists,
    BudgetExhausted,
    CkptdError,
    DaemonUnavailable,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotFound,
    TierFailed,
    Timeout,
)
from ckptd.core.types import Level
from ckptd_client.manager import CheckpointManager, RestoreInfo, SaveHandle
from ckptd_client.restore.strict import StateMismatchError
from ckptd_client.save.overlap import StateChangedDuringCopy

__all__ = [
    "AlreadyExists", "BudgetExhausted", "CheckpointManager", "CkptdError", "DaemonUnavailable",
    "FailedPrecondition", "IntegrityError", "InvalidArgument", "Level", "NotFound", "RestoreInfo",
    "SaveHandle", "StateChangedDuringCopy", "StateMismatchError", "TierFailed", "Timeout",
]
