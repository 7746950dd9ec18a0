"""The manager's ``on_error`` policy holds for every call of the training loop: with the daemon
gone, ``save()`` warns under "warn" and so does ``wait_until_finished()`` (README's loop must not
crash on its last line); under "raise" both raise DaemonUnavailable."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
from ckptd_client import CheckpointManager

from ckptd.core.errors import DaemonUnavailable
from tests.conftest import DaemonProc

STATE = {"w": np.arange(4096, dtype=np.float32)}


def test_warn_policy_covers_wait_until_finished(daemon_factory: Callable[..., DaemonProc],
                                                caplog: pytest.LogCaptureFixture) -> None:
    d = daemon_factory()
    m = CheckpointManager("policy-warn", rank=0, world_size=1, addr=d.addr, connect_timeout_s=5)
    assert m.save(1, STATE).ok
    d.kill()
    with caplog.at_level(logging.WARNING, logger="ckptd_client"):
        assert not m.save(2, STATE).ok  # warned, not raised
        assert m.wait_until_finished(timeout_s=5) is None  # step 1 cannot be confirmed: warned too
    assert any("wait" in r.getMessage() and "policy-warn" in r.getMessage() for r in caplog.records), caplog.text
    m.close()


def test_raise_policy_raises_from_wait_until_finished(daemon_factory: Callable[..., DaemonProc]) -> None:
    d = daemon_factory()
    m = CheckpointManager("policy-raise", rank=0, world_size=1, addr=d.addr, connect_timeout_s=5, on_error="raise")
    assert m.save(1, STATE).ok
    d.kill()
    with pytest.raises(DaemonUnavailable):
        m.wait_until_finished(timeout_s=5)
    m.close()
