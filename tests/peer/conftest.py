"""Fixtures of the peer tests (their helpers are in tests/peer/_kit.py).

``node`` is a peer node in a child process (tests/peer/_node.py), as ``(process, port)``, so a
test can SIGSTOP or kill it; at teardown it is resumed, killed and reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from tests.peer._kit import spawn_node


@pytest.fixture
def node() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc, port = spawn_node("node-b")
    yield proc, port
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait(10)
