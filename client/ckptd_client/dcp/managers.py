"""The CheckpointManager a DCP writer or reader uses in a process that did not hand it one.

The process checkpointer of ``dcp.async_save`` runs the save in another process, which receives
the writer pickled (its configuration only). There one manager per configuration is opened and
kept for the life of the process, so its connection and slot mappings serve every later save.

``LazyManager`` is the ``manager`` property both plugins share: the manager handed in, else this
process's manager for the plugin's configuration.

Invariant: such a manager never takes part in collectives (no peer gathering, no restore premap):
the process that uses it runs beside the trainer, not in step with the other ranks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ckptd_client.manager_base import ManagerBase


@dataclass(frozen=True)
class ManagerConfig:
    job: str
    addr: str | None
    rank: int | None
    world_size: int | None
    allow_new_world_size: bool = False

    @staticmethod
    def of(m: ManagerBase) -> ManagerConfig:
        return ManagerConfig(m.job, m.addr, m.rank, m.world_size, m.allow_new_world_size)


_MANAGERS: dict[ManagerConfig, ManagerBase] = {}
_LOCK = threading.Lock()


def manager_for(cfg: ManagerConfig) -> ManagerBase:
    with _LOCK:
        m = _MANAGERS.get(cfg)
        if m is None:
            m = ManagerBase(cfg.job, rank=cfg.rank, world_size=cfg.world_size, addr=cfg.addr,
                                  on_error="raise", gather_peers=False, premap_restore=False,
                                  allow_new_world_size=cfg.allow_new_world_size)
            _MANAGERS[cfg] = m
        return m


class LazyManager:
    """Mixin of the DCP writer and reader: ``manager`` is the one handed in, else ``manager_for(config)``."""

    config: ManagerConfig
    _manager: ManagerBase | None

    @property
    def manager(self) -> ManagerBase:
        if self._manager is None:
            self._manager = manager_for(self.config)
        return self._manager
