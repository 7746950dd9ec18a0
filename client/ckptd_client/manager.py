"""CheckpointManager: the training-side API of ckptd.

``save(step, state)`` flattens the state, leases a daemon-owned shm slot, copies every tensor
straight into it (the only stall), commits, and returns a ``SaveHandle``; the daemon does the
rest in the background. ``restore(state)`` fills the state in place from the newest committed
step (or a given one), served by the nearest valid tier. The machinery is ``ManagerBase``
(manager_base.py); this class adds states holding DTensors, which go through
``torch.distributed.checkpoint`` with ckptd's storage writer and reader (dcp/route.py).

Invariant: the DCP plugin (``ckptd_client.dcp``) builds on ``ManagerBase`` and never on this
module, so the layering has no cycle: manager -> dcp -> manager_base.
"""

from __future__ import annotations

from typing import Any

from ckptd_client.handles import RestoreInfo, SaveHandle
from ckptd_client.manager_base import ManagerBase
from ckptd_client.restore.strict import Strictness

__all__ = ["CheckpointManager", "RestoreInfo", "SaveHandle"]


class CheckpointManager(ManagerBase):
    """Save and restore a rank's state through its node's ckptd daemon (see ManagerBase)."""

    def _save_dtensors(self, step: int, state: Any) -> SaveHandle:
        from ckptd_client.dcp.route import save_via_dcp  # needs torch.distributed

        return save_via_dcp(self, step, state)

    def _restore_dtensors(self, state: Any, step: int | str, strictness: Strictness) -> int | None:
        from ckptd_client.dcp.route import restore_via_dcp  # needs torch.distributed

        return restore_via_dcp(self, state, step, strictness)

    def __enter__(self) -> CheckpointManager:
        return self
