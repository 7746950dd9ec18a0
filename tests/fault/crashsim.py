"""Crash and power-loss simulation for code that mutates files through ckptd.core.fsops.FsOps.

``Recorder`` is an ``FsOps`` that performs every mutation for real and also applies it to an
abstract, pessimistic persistence ``Model`` of the tree under a base directory:

- a file is an inode with its current bytes and the bytes it had at its last ``fsync`` (a file
  never fsync'd has none: empty after a power loss);
- a directory is an inode with its current entries and the entries it had at its last
  ``fsync_dir`` (a new directory, or a new name in one, survives a power loss only once the
  directory holding it was fsync'd after the change; entries point at inodes, so a hard link
  and its source share the bytes);
- inodes are never forgotten: an unlink that was not made durable brings the old name back,
  with whatever bytes that inode had durably.

``rmtree`` is split into its unlinks and rmdirs, each one mutation. Before every mutation (and
once more at the end, via ``boundary()``) the recorder calls ``on_boundary(k)`` with ``k`` the
number of mutations done so far: the real tree at that moment is exactly the tree a process
crash just before mutation ``k + 1`` leaves. ``Model.view`` gives three states per boundary:

- ``crash``: the current tree (what a SIGKILL leaves; checked equal to the real tree);
- ``power``: the durable tree of the model (un-fsync'd data and directory changes dropped);
- ``torn``: current names and sizes, but every byte not covered by an fsync reads as zero (a
  file system that journals metadata and not data).

``materialise`` writes a view into a fresh directory. Workloads mark events between mutations
with ``note`` (e.g. "commit of step 2 returned") so checks know what was acknowledged when.
``record`` runs a workload once and returns the model at every boundary, having checked at each
one that the model's current tree is the real tree (a mutation that bypassed the seam shows).
Counting and reporting what the checks found is crashreport.py's job.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptd.core.fsops import FsOps, StrPath

FLAVOURS = ("crash", "power", "torn")
Found = list[tuple[str, str]]  # violations: (kind, what)


@dataclass
class Inode:
    is_dir: bool
    data: bytes = b""  # file: current bytes
    synced_data: bytes = b""  # file: bytes at the last fsync
    entries: dict[str, int] = field(default_factory=dict)  # dir: current names
    synced_entries: dict[str, int] = field(default_factory=dict)  # dir: names at the last fsync

    def clone(self) -> Inode:
        return Inode(self.is_dir, self.data, self.synced_data, dict(self.entries), dict(self.synced_entries))


# A view: relative path -> None for a directory, or (inode number, bytes) for a file.
View = dict[str, tuple[int, bytes] | None]


class Model:
    """The abstract tree under one base directory; inode 0 is the base (always durable)."""

    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {0: Inode(is_dir=True)}

    @classmethod
    def from_tree(cls, base: Path) -> Model:
        """A model of an existing tree, all of it durable (hard links share an inode)."""
        m = cls()
        by_real_ino: dict[int, int] = {}

        def walk(real: Path, ino: int) -> None:
            for child in sorted(real.iterdir()):
                st = child.lstat()
                if child.is_dir():
                    sub = m._new(Inode(is_dir=True))
                    walk(child, sub)
                elif st.st_ino in by_real_ino:
                    sub = by_real_ino[st.st_ino]
                else:
                    data = child.read_bytes()
                    sub = by_real_ino[st.st_ino] = m._new(Inode(False, data, data))
                m.inodes[ino].entries[child.name] = sub
            m.inodes[ino].synced_entries = dict(m.inodes[ino].entries)

        walk(base, 0)
        return m

    def clone(self) -> Model:
        m = Model()
        m.inodes = {i: n.clone() for i, n in self.inodes.items()}
        return m

    def _new(self, inode: Inode) -> int:
        ino = len(self.inodes)
        self.inodes[ino] = inode
        return ino

    # -- lookups -------------------------------------------------------------------------------
    def lookup(self, parts: tuple[str, ...]) -> int:
        ino = 0
        for name in parts:
            ino = self.inodes[ino].entries[name]
        return ino

    def parent(self, parts: tuple[str, ...]) -> tuple[Inode, str]:
        return self.inodes[self.lookup(parts[:-1])], parts[-1]

    # -- mutations (applied after the real call succeeded) ------------------------------------
    def create_file(self, parts: tuple[str, ...]) -> int:
        d, name = self.parent(parts)
        ino = d.entries[name] = self._new(Inode(is_dir=False))
        return ino

    def mkdir(self, parts: tuple[str, ...]) -> None:
        d, name = self.parent(parts)
        d.entries[name] = self._new(Inode(is_dir=True))

    def pwrite(self, ino: int, data: bytes, offset: int) -> None:
        f = self.inodes[ino]
        old = f.data
        f.data = old[:offset].ljust(offset, b"\0") + data + old[offset + len(data):]

    def truncate(self, ino: int) -> None:
        self.inodes[ino].data = b""

    def fsync(self, ino: int) -> None:
        f = self.inodes[ino]
        f.synced_data = f.data

    def fsync_dir(self, parts: tuple[str, ...]) -> None:
        d = self.inodes[self.lookup(parts)]
        d.synced_entries = dict(d.entries)

    def link(self, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
        d, name = self.parent(dst)
        d.entries[name] = self.lookup(src)

    def remove(self, parts: tuple[str, ...]) -> None:
        d, name = self.parent(parts)
        del d.entries[name]

    def rename(self, src: tuple[str, ...], dst: tuple[str, ...]) -> None:
        ino = self.lookup(src)
        self.remove(src)
        d, name = self.parent(dst)
        d.entries[name] = ino

    # -- views ---------------------------------------------------------------------------------
    def view(self, flavour: str) -> View:
        """The tree a ``flavour`` (see FLAVOURS) of crash leaves, as relative path -> content."""
        durable_names = flavour == "power"
        out: View = {}

        def content(f: Inode) -> bytes:
            if flavour == "crash":
                return f.data
            if flavour == "power":
                return f.synced_data
            n = len(f.data)  # torn: current size, only fsync'd bytes survive
            return f.synced_data[:n].ljust(n, b"\0")

        def walk(ino: int, prefix: str) -> None:
            d = self.inodes[ino]
            for name, sub in sorted((d.synced_entries if durable_names else d.entries).items()):
                rel = f"{prefix}{name}"
                node = self.inodes[sub]
                if node.is_dir:
                    out[rel] = None
                    walk(sub, rel + "/")
                else:
                    out[rel] = (sub, content(node))

        walk(0, "")
        return out


def read_tree(base: Path) -> dict[str, bytes | None]:
    """The real tree under base as relative path -> bytes (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        prefix = "" if rel == "." else rel + "/"
        for d in dirnames:
            out[prefix + d] = None
        for f in filenames:
            out[prefix + f] = Path(dirpath, f).read_bytes()
    return out


def strip_inodes(view: View) -> dict[str, bytes | None]:
    return {p: (None if c is None else c[1]) for p, c in view.items()}


def fingerprint(view: View) -> str:
    """A digest of a view's names, kinds and bytes (hard-link identity aside)."""
    h = hashlib.blake2b(digest_size=16)
    for p, c in sorted(view.items()):
        h.update(p.encode() + b"\0")
        h.update(b"d" if c is None else b"f" + hashlib.blake2b(c[1], digest_size=16).digest())
    return h.hexdigest()


def materialise(view: View, dest: Path) -> None:
    """Write a view under ``dest`` (created; must not exist), hard links kept as links."""
    dest.mkdir(parents=True)
    first_path: dict[int, Path] = {}
    for rel, c in sorted(view.items()):
        p = dest / rel
        if c is None:
            p.mkdir()
        elif c[0] in first_path:
            os.link(first_path[c[0]], p)
        else:
            p.write_bytes(c[1])
            first_path[c[0]] = p


class Recorder(FsOps):
    """Performs each mutation for real and applies it to ``model``; see the module docstring.

    ``skip`` names methods to turn into no-ops (neither done nor modelled): a deliberately
    broken tier, to show the checks catch one.
    """

    def __init__(
        self,
        base: Path,
        model: Model | None = None,
        on_boundary: Callable[[int], None] | None = None,
        skip: Collection[str] = (),
    ) -> None:
        self.base = base
        self.model = model if model is not None else Model.from_tree(base)
        self.on_boundary = on_boundary
        self.skip = frozenset(skip)
        self.ops: list[str] = []  # "kind relpath", one per mutation, in order
        self.notes: list[tuple[int, str]] = []  # (mutations done before it, event)
        self._fds: dict[int, tuple[int, str]] = {}  # fd -> (inode, path)

    def _parts(self, path: StrPath) -> tuple[str, ...]:
        return Path(path).relative_to(self.base).parts

    def _mutation(self, kind: str, path: StrPath) -> bool:
        """Announce a mutation: the boundary before it, then log it. False: skip it."""
        if kind in self.skip:
            return False
        if self.on_boundary is not None:
            self.on_boundary(len(self.ops))
        self.ops.append(f"{kind} {'/'.join(self._parts(path))}")
        return True

    def boundary(self) -> None:
        """The state after the last mutation (call once the workload is done)."""
        if self.on_boundary is not None:
            self.on_boundary(len(self.ops))

    def note(self, event: str) -> None:
        self.notes.append((len(self.ops), event))

    # -- FsOps ---------------------------------------------------------------------------------
    def open(self, path: StrPath, flags: int, mode: int = 0o600) -> int:
        if flags & (os.O_CREAT | os.O_TRUNC):
            kind = "open-direct" if flags & os.O_DIRECT else "open"
            if not self._mutation(kind, path):
                raise AssertionError("an open cannot be skipped")
        existed = os.path.lexists(path)
        fd = os.open(path, flags, mode)
        parts = self._parts(path)
        if not existed:
            ino = self.model.create_file(parts)
        else:
            ino = self.model.lookup(parts)
            if flags & os.O_TRUNC:
                self.model.truncate(ino)
        self._fds[fd] = (ino, os.fspath(path))
        return fd

    def close(self, fd: int) -> None:
        os.close(fd)
        self._fds.pop(fd, None)

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        ino, path = self._fds[fd]
        if not self._mutation("pwrite", path):
            return len(data)
        n = os.pwrite(fd, data, offset)
        self.model.pwrite(ino, bytes(data[:n]), offset)
        return n

    def fsync(self, fd: int) -> None:
        ino, path = self._fds[fd]
        if self._mutation("fsync", path):
            os.fsync(fd)
            self.model.fsync(ino)

    def fsync_dir(self, path: StrPath) -> None:
        if self._mutation("fsync_dir", path):
            super().fsync_dir(path)
            self.model.fsync_dir(self._parts(path))

    def mkdir(self, path: StrPath, mode: int = 0o777) -> None:
        if self._mutation("mkdir", path):
            os.mkdir(path, mode)
            self.model.mkdir(self._parts(path))

    def link(self, src: StrPath, dst: StrPath) -> None:
        if self._mutation("link", dst):
            os.link(src, dst)
            self.model.link(self._parts(src), self._parts(dst))

    def unlink(self, path: StrPath) -> None:
        if self._mutation("unlink", path):
            os.unlink(path)
            self.model.remove(self._parts(path))

    def rmdir(self, path: StrPath) -> None:
        if self._mutation("rmdir", path):
            os.rmdir(path)
            self.model.remove(self._parts(path))

    def replace(self, src: StrPath, dst: StrPath) -> None:
        if self._mutation("replace", dst):
            os.replace(src, dst)
            self.model.rename(self._parts(src), self._parts(dst))

    def rmtree(self, path: StrPath) -> None:
        """Depth first, one mutation per unlink and rmdir, errors ignored (as FsOps.rmtree)."""
        p = Path(path)
        try:
            children = sorted(p.iterdir())
        except OSError:
            children = []
        for child in children:
            if child.is_dir() and not child.is_symlink():
                self.rmtree(child)
            else:
                try:
                    self.unlink(child)
                except OSError:
                    pass
        try:
            self.rmdir(p)
        except OSError:
            pass


def record(
    base: Path, model: Model, run: Callable[[Recorder], Any], skip: Collection[str] = ()
) -> tuple[Recorder, list[Model], list[int]]:
    """Run ``run(recorder)`` on ``base`` once; return the recorder, the model at each boundary
    k = 0..N, and the boundaries where the real tree differed from the model's current tree."""
    snapshots: list[Model] = []
    mismatches: list[int] = []

    def on_boundary(k: int) -> None:
        if strip_inodes(rec.model.view("crash")) != read_tree(base):
            mismatches.append(k)
        snapshots.append(rec.model.clone())

    rec = Recorder(base, model, on_boundary, skip)
    run(rec)
    rec.boundary()
    return rec, snapshots, mismatches
