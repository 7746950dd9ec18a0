"""One daemon per socket path: the claim a daemon takes on its socket before it listens there.

The root lock (``{root}/ckptd.lock``) keeps two daemons off one root, but two daemons with
different roots could still be given the same ``daemon.socket``; the second would unlink the
first one's socket and answer in its place. ``claim_socket`` prevents that:

* it takes an exclusive ``flock`` on ``<socket>.lock`` beside the socket and writes the owner's
  pid and root there (JSON); a daemon that finds the lock held refuses to start and names them;
* holding the lock, it probes a socket file still present: if something answers on it (a process
  that does not take this lock), it refuses too, naming the listener's pid (SO_PEERCRED);
* otherwise the socket file is stale (its daemon died) and is removed, so the caller may bind.

Invariants: the claim lasts as long as the process (the descriptor is close-on-exec and never
closed; the kernel drops the lock when the daemon dies, however it dies). The lock file itself is
never removed: unlinking a flock'd file lets a third process lock a new inode while the second
still holds the old one. Claiming a path this process already holds is a no-op.

``set_socket_access`` gives the socket its configured mode: 0600 (the daemon's user only), or
0660 in ``daemon.socket_group`` for trainers of another user, whose directory, when the daemon
owns it and it is private, then lets that group in (0710: enter, not list).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Final

from ckptd.core.errors import FailedPrecondition

LOCK_SUFFIX: Final = ".lock"
PROBE_TIMEOUT_S: Final = 1.0
_held: dict[Path, int] = {}  # socket path -> descriptor of its lock file, for the process lifetime


def lock_path(sock: Path) -> Path:
    """The lock file that guards ``sock``."""
    return sock.with_name(sock.name + LOCK_SUFFIX)


def _owner(fd: int) -> str:
    """"pid N, root R" from the lock file of another daemon (what it wrote; may be empty)."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    pid, root = info.get("pid"), info.get("root")
    return f"pid {pid if isinstance(pid, int) else 'unknown'}, root {root if isinstance(root, str) else 'unknown'}"


def listener_pid(sock: Path) -> int | None:
    """The pid of the process accepting on ``sock`` (0 when it cannot be told), or None when
    nothing answers there (no listener: a stale socket file)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PROBE_TIMEOUT_S)
    try:
        s.connect(str(sock))
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError:
        return 0  # e.g. a full backlog: something is there
    try:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    except OSError:
        return 0
    finally:
        s.close()


def claim_socket(sock: Path, root: Path | None = None) -> None:
    """Claim ``sock`` for this process and remove a stale socket file there.

    Raises FailedPrecondition naming the other daemon (pid, root) when a live one holds the path.
    The socket's directory must exist."""
    if sock in _held:
        return
    path = lock_path(sock)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPrecondition(
                f"daemon.socket {sock} is in use by another ckptd ({_owner(fd)}); stop that daemon "
                "or give this one another socket (--socket)") from None
        if sock.exists() or sock.is_socket():
            pid = listener_pid(sock)
            if pid is not None:
                who = f"pid {pid}" if pid > 0 else "a process"
                raise FailedPrecondition(
                    f"daemon.socket {sock} is in use: {who} accepts connections on it (it does not hold "
                    f"{path}); stop it or give this daemon another socket (--socket)")
            sock.unlink()
        os.ftruncate(fd, 0)
        owner = {"pid": os.getpid(), "root": os.path.abspath(root) if root is not None else None}
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    _held[sock] = fd


def set_socket_access(sock: Path, gid: int | None) -> None:
    """0600 for the daemon's user only (``gid`` None), else 0660 in group ``gid``; with a group,
    the socket's directory, when the daemon owns it and it is private, becomes 0710 in that group."""
    if gid is None:
        os.chmod(sock, 0o600)
        return
    os.chown(sock, -1, gid)
    os.chmod(sock, 0o660)
    parent = sock.parent
    st = parent.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0:
        os.chown(parent, -1, gid)
        os.chmod(parent, stat.S_IMODE(st.st_mode) | 0o010)
