"""The one seam through which the disk tier (and the pin store) mutate the file system.

``FsOps`` is a thin object over plain ``os`` calls: create or open a file, ``pwrite``, ``fsync``,
``fsync_dir``, ``mkdir``, ``link``, ``unlink``, ``rmdir``, ``replace``, ``rmtree``. Code that
changes files calls these methods and nothing else, so a test can substitute a recording
implementation (tests/fault/crashsim.py) that logs every mutation in order and models what a
crash or a power loss would leave behind.

Invariants:
- every mutating call passes the failpoint ``fs.mutation`` (``MUTATION``) exactly once, before
  the mutation, so ``CKPTD_FAILPOINTS="fs.mutation=kill@N"`` SIGKILLs a daemon just before its
  N-th file mutation, and ``CKPTD_FAILPOINTS_LOG`` counts them; ``rmtree`` is one mutation here
  (a recording implementation splits it into its unlinks and rmdirs);
- an ``open`` is a mutation only when it can create or truncate (``O_CREAT`` / ``O_TRUNC``);
  reads, ``stat`` and ``close`` are not mutations and pass no failpoint;
- nothing is buffered or retried here: each method is one system call (``makedirs`` and
  ``fsync_dir`` a few), with the same errors ``os`` raises. An fsync error is the caller's to
  handle (DESIGN.md section 3: the file is lost, rewrite it).
With failpoints off the cost over the bare ``os`` call is one method call and one function call.

Two read-only checks of the file system the config validation uses live here too:
``resolve_group`` (a group name or gid on this host) and ``check_shm_dir`` (the slot directory
must be ckptd's own, never a shared one).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Final

from ckptd.core import failpoints
from ckptd.core.errors import InvalidArgument

MUTATION: Final = "fs.mutation"

StrPath = str | os.PathLike[str]


DIR_MODE: Final = 0o700  # every directory ckptd makes under its root


class FsOps:
    """Plain ``os`` calls, each mutation announced to the failpoints first."""

    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        if flags & (os.O_CREAT | os.O_TRUNC):
            failpoints.hit(MUTATION)
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        failpoints.hit(MUTATION)
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        failpoints.hit(MUTATION)
        os.fsync(fd)

    def fsync_dir(self, path: StrPath) -> None:
        """Make the entries of directory ``path`` durable."""
        failpoints.hit(MUTATION)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, path: StrPath, mode: int = DIR_MODE) -> None:
        failpoints.hit(MUTATION)
        os.mkdir(path, mode)
        os.chmod(path, mode)  # whatever the umask: checkpoints are the daemon's alone

    def link(self, src: StrPath, dst: StrPath) -> None:
        """Hard-link ``src`` as ``dst``; FileExistsError if ``dst`` exists (never replaces)."""
        failpoints.hit(MUTATION)
        os.link(src, dst)

    def unlink(self, path: StrPath) -> None:
        failpoints.hit(MUTATION)
        os.unlink(path)

    def rmdir(self, path: StrPath) -> None:
        failpoints.hit(MUTATION)
        os.rmdir(path)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        failpoints.hit(MUTATION)
        os.replace(src, dst)

    def rmtree(self, path: StrPath) -> None:
        """Remove a tree, ignoring errors (a missing tree is not an error)."""
        failpoints.hit(MUTATION)
        shutil.rmtree(path, ignore_errors=True)

    def makedirs(self, path: Path) -> None:
        """Create ``path`` and its missing parents durably: each new directory's parent is
        fsync'd after the directory is made, so a power loss cannot drop it."""
        missing: list[Path] = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                self.mkdir(d)
            except FileExistsError:
                pass  # made meanwhile by another thread: its entry is made durable here all the same
            self.fsync_dir(d.parent)


#: The implementation every caller uses unless given another one.
DEFAULT: Final = FsOps()


def resolve_group(group: str) -> int:
    """A group name or numeric gid -> gid; InvalidArgument naming daemon.socket_group if unknown."""
    import grp

    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError, ValueError):
        raise InvalidArgument(f"daemon.socket_group: no group {group!r} on this host") from None


def check_shm_dir(shm: Path, root: Path, socket: Path) -> None:
    """daemon.shm_dir is made 0700 and emptied of every file that is not a slot at start-up, so it
    must be a directory of ckptd's own: never a shared one (sticky or world-writable, like /tmp or
    /dev/shm), "/", the home directory, or one holding the daemon's root or socket."""
    p = Path(os.path.abspath(shm))
    home = Path(os.path.abspath(os.path.expanduser("~")))
    root, sock = Path(os.path.abspath(root)), Path(os.path.abspath(socket))
    if p in (Path("/"), home) or root.is_relative_to(p) or sock.is_relative_to(p):
        raise InvalidArgument(f"daemon.shm_dir {shm} must be a directory of ckptd's own (it removes every "
                              "file there that is not a slot), not /, the home directory or one holding "
                              "daemon.root or daemon.socket")
    try:
        mode = p.stat().st_mode
    except OSError:
        return  # created at start-up (or reported there)
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        raise InvalidArgument(f"daemon.shm_dir {shm} is a shared directory (mode {stat.S_IMODE(mode):o}); ckptd "
                              f"makes it private and removes every file there that is not a slot: use a directory "
                              f"of its own, e.g. {p / 'ckptd'}")
