"""The retention policy a daemon root was served with, kept with the root for ``ckptctl --root``.

A daemon writes ``{root}/retention.json`` at start (it holds the root lock then), so that
``ckptctl --root DIR gc`` applies the policy the root's daemon applies rather than built-in
defaults. Layout (versioned JSON)::

    {"schema": "ckptd.retention/v1",
     "disk": {"max_to_keep": 3, "keep_period": 0, "every_n_steps": 1}}

Invariants: the file is replaced atomically (temporary file, fsync, rename, fsync of the
directory), so a reader sees the old or the new policy, never a torn one; a file that is missing,
unreadable or of another schema is reported as absent (``read`` returns None) and the caller falls
back to the defaults. Command-line flags of ckptctl override what is recorded.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ckptd.core.config import DiskSection
from ckptd.core.fsops import DEFAULT as DEFAULT_FS
from ckptd.core.fsops import FsOps

log = logging.getLogger("ckptd.retention")

FILENAME: Final = "retention.json"
SCHEMA: Final = "ckptd.retention/v1"
MAX_FILE_BYTES: Final = 64 * 2**10


@dataclass(frozen=True)
class DiskPolicy:
    max_to_keep: int
    keep_period: int
    every_n_steps: int


def path_for_data(data_root: Path) -> Path | None:
    """The record of a disk tier's data directory: ``{daemon root}/retention.json`` for a daemon's
    ``data/`` directory; None for a bare data directory (no daemon root around it)."""
    return data_root.parent / FILENAME if data_root.name == "data" else None


def write(root: Path, disk: DiskSection, fs: FsOps = DEFAULT_FS) -> None:
    """Record ``disk``'s retention in ``{root}/retention.json`` atomically (the caller holds the
    root lock)."""
    target = root / FILENAME
    doc = {"schema": SCHEMA, "disk": {"max_to_keep": disk.max_to_keep, "keep_period": disk.keep_period,
                                      "every_n_steps": disk.every_n_steps}}
    data = (json.dumps(doc, sort_keys=True) + "\n").encode()
    tmp = root / f".{FILENAME}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            written = 0
            while written < len(data):
                written += fs.pwrite(fd, memoryview(data)[written:], written)
            fs.fsync(fd)
        finally:
            fs.close(fd)
        fs.replace(tmp, target)
        fs.fsync_dir(root)
    except BaseException:
        try:
            fs.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _count(value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"expected an integer >= {low}, got {value!r}")
    return value


def read(path: Path) -> DiskPolicy | None:
    """The disk policy recorded at ``path``, or None (missing, unreadable or invalid: logged)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    try:
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError("file too large")
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("disk"), dict):
            raise ValueError(f"not a {SCHEMA} document")
        disk = doc["disk"]
        return DiskPolicy(_count(disk.get("max_to_keep"), 1), _count(disk.get("keep_period"), 0),
                          _count(disk.get("every_n_steps"), 1))
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
