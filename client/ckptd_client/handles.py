"""What the manager hands back: ``SaveHandle`` (one save: wait for a level, its status) and
``RestoreInfo`` (where the last restore came from and what it skipped).

A handle holds the manager that made it and asks it (``_wait``, ``conn``) for what it waits on; it
owns nothing and starts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import BudgetExhausted, CkptdError
from ckptd.core.types import Level
from ckptd_client.rpc import Connection
from ckptd_client.save.overlap import CopyJob


class Waiter(Protocol):
    """What a handle needs of the manager that made it (``ManagerBase`` is one)."""

    job: str
    conn: Connection

    def _wait(self, step: int, level: Level, timeout_s: float | None) -> pb.StepStatus: ...


@dataclass
class SaveHandle:
    """What a save returned. ``wait(level)`` blocks until the step reaches it."""

    manager: Waiter
    step: int
    stall_s: float = 0.0
    waited_s: float = 0.0
    nbytes: int = 0
    skipped: bool = False
    error: CkptdError | None = None
    copy: CopyJob | None = None  # an overlapped save's copy (overlap.py)

    def wait_copied(self, timeout_s: float | None = None) -> bool:
        """Block until an overlapped save's bytes are in the slot (the state may change then)."""
        return self.copy is None or self.copy.wait_copied(timeout_s)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.skipped

    def wait(self, level: Level = Level.STAGED, timeout_s: float | None = None) -> pb.StepStatus:
        """Block until the whole step (every rank) reaches ``level``.

        Raises the save's own error if it failed, TierFailed if the tier failed or skipped the
        step (e.g. superseded by a newer one), Timeout past ``timeout_s``.
        """
        if self.copy is not None:
            self.copy.committed.exception(timeout_s)  # the commit follows the copy
        if self.error is not None:
            raise self.error
        if self.skipped:
            raise BudgetExhausted(f"save of step {self.step} was skipped (no slot free in the budget)")
        return self.manager._wait(self.step, level, timeout_s)

    def status(self) -> pb.StepStatus:
        m = self.manager
        return m.conn.call(m.conn.stub.GetStepStatus, pb.GetStepStatusRequest(job=m.job, step=self.step))


@dataclass
class RestoreInfo:
    step: int
    served_from: str
    seconds: float
    daemon_read_s: float
    rejected: list[str] = field(default_factory=list)
    #: newer steps skipped because no valid copy of this rank's shard was left (restore "latest")
    unusable_steps: list[int] = field(default_factory=list)


__all__ = ["RestoreInfo", "SaveHandle"]
