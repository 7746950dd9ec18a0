"""Named failpoints in the commit paths, for fault tests only.

Enabled by ``CKPTD_FAILPOINTS="name=action[,name=action...]"`` read once at import, where action
is ``kill`` (SIGKILL this process on the spot), ``eio`` / ``enospc`` (raise that OSError), or
``kill@N`` / ``eio@N`` (act on the N-th hit only, 1-based). With the variable unset, ``hit`` is a
dict lookup on an empty dict. ``CKPTD_FAILPOINTS_LOG=path`` appends every hit name to a file, so a
test can count the crash points a path passes through.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Final

_ACTIONS: Final[dict[str, tuple[str, int]]] = {}
_COUNTS: dict[str, int] = {}
_LOG: Final = os.environ.get("CKPTD_FAILPOINTS_LOG", "")


def _parse(spec: str) -> None:
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        if action not in ("kill", "eio", "enospc"):
            raise ValueError(f"CKPTD_FAILPOINTS: unknown action {action!r} for {name!r}")
        _ACTIONS[name] = (action, int(nth) if nth else 0)


_parse(os.environ.get("CKPTD_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Pass through failpoint ``name``; act if a test enabled it."""
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(name + "\n")
    if not _ACTIONS:
        return
    spec = _ACTIONS.get(name)
    if spec is None:
        return
    action, nth = spec
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if nth and _COUNTS[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.EIO if action == "eio" else errno.ENOSPC
    raise OSError(code, f"{os.strerror(code)} (failpoint {name})")
