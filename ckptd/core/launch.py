"""Starting a process that never outlives the one that started it.

``die_with_parent(args)`` wraps a command line in a tiny launcher that asks Linux
(``PR_SET_PDEATHSIG``) to signal the command when its starter dies, even by SIGKILL, then execs
it; the setting survives exec. Tests, benches and the demo start daemons through it, so a killed
run never leaves a daemon behind, also one in a session of its own.

Invariant: nothing runs in the forked copy of the starter before exec. A ``preexec_fn`` would
run there, where grpc's fork handlers restart their poller on an epoll fd that ``close_fds`` has
just closed, and the child can abort ("epoll_wait error: Bad file descriptor") before it execs.
"""

from __future__ import annotations

import os
import signal
import sys

_LAUNCHER = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2]), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)  # the starter died before the guard was set\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def die_with_parent(args: list[str], sig: int = signal.SIGKILL) -> list[str]:
    """``args`` run so that the command gets ``sig`` when the process that started it dies;
    ``args`` unchanged off Linux. ``args[0]`` must be a path (it is exec'd, not looked up).
    The signal follows the *thread* that started it: start children from a thread that lives as
    long as they should."""
    if sys.platform != "linux":
        return list(args)
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), str(int(sig)), *args]
