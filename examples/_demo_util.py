"""What every part of the demo shares: its progress output, its error, log tails, process helpers.

``say`` prints one timestamped progress line on stdout (seconds since the demo started);
``DemoError`` is a process that failed or timed out; ``die_with_parent`` makes a child die with
the demo even when the demo is SIGKILLed; ``tail`` and ``free_port`` serve the daemons and the
trainers alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import time
from pathlib import Path


class DemoError(RuntimeError):
    """The demo could not run to the end (a process failed or timed out)."""


_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[demo {time.monotonic() - _T0:5.1f}s] {msg}", flush=True)


def die_with_parent(sig: int) -> None:
    """In a child before exec: ask Linux to send ``sig`` when the demo dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
