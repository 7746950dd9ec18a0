"""Pinned steps: steps retention never removes, persisted as one small JSON file per job.

Layout: ``{dir}/{job}.json`` holding ``{"job": JOB, "steps": [STEP, ...]}``; the daemon keeps it
in ``{root}/pins/`` (beside ``data/``), ``ckptctl --root`` uses the same files. Each change is
written atomically (a temporary file, fsync, rename, fsync of the directory), so a crash leaves
the old or the new set, never a torn file. A job with no pins has no file. Files that do not
parse are reported and ignored (retention then treats the job as having no pins, and the next
change rewrites the file).

``PinStore.pins`` is one dict, mutated in place and never replaced, so retention code can hold a
reference to it (``DiskDrainer.operator_pins``, ``ObjectUploader.operator_pins``).

Every file mutation goes through the store's ``FsOps`` (ckptd/core/fsops.py), the seam crash-point
tests record; the pins directory is made durably (its parent fsync'd when it is created).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from ckptd.core.fsops import DEFAULT as DEFAULT_FS
from ckptd.core.fsops import FsOps
from ckptd.core.types import validate_job, validate_step

log = logging.getLogger("ckptd.pins")

PINS_DIRNAME = "pins"
MAX_PIN_FILE_BYTES = 1 << 20


def pins_dir_for_data(data_root: Path) -> Path:
    """Where the pins of a disk tier's data directory live: ``{daemon root}/pins`` for a daemon's
    ``data/`` directory, else ``{data}/.pins`` (not a valid job name, so never listed as a job)."""
    if data_root.name == "data":
        return data_root.parent / PINS_DIRNAME
    return data_root / ".pins"


class PinStore:
    """The pinned steps of every job under one directory."""

    def __init__(self, directory: Path, fs: FsOps = DEFAULT_FS) -> None:
        self.dir = directory
        self.fs = fs
        self.pins: dict[str, set[int]] = {}

    def path(self, job: str) -> Path:
        return self.dir / f"{validate_job(job)}.json"

    def load(self) -> None:
        """Read every job's file (a missing directory means no pins)."""
        self.pins.clear()
        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("*.json")):
            try:
                if p.stat().st_size > MAX_PIN_FILE_BYTES:
                    raise ValueError("file too large")
                obj = json.loads(p.read_bytes())
                job = validate_job(obj["job"])
                if p.name != f"{job}.json":
                    raise ValueError(f"file names job {job!r}")
                steps = {validate_step(s) for s in obj["steps"]}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring pins file %s: %s", p, exc)
                continue
            if steps:
                self.pins[job] = steps

    def get(self, job: str) -> set[int]:
        return set(self.pins.get(job, ()))

    def change(self, job: str, step: int, pinned: bool) -> list[int]:
        """Pin or unpin one step, persist the job's pins; return them, sorted."""
        steps = self.get(job)
        if pinned:
            steps.add(validate_step(step))
        else:
            steps.discard(step)
        self._write(job, steps)
        if steps:
            self.pins[job] = steps
        else:
            self.pins.pop(job, None)
        return sorted(steps)

    def _write(self, job: str, steps: set[int]) -> None:
        target = self.path(job)
        if not steps:
            if target.exists():
                self.fs.unlink(target)
                self.fs.fsync_dir(self.dir)
            return
        if not self.dir.is_dir():
            self.fs.makedirs(self.dir)
        tmp = self.dir / f".{job}.json.{uuid.uuid4().hex[:8]}.tmp"
        data = json.dumps({"job": job, "steps": sorted(steps)}, separators=(",", ":")).encode() + b"\n"
        try:
            fd = self.fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                written = 0
                while written < len(data):
                    written += self.fs.pwrite(fd, memoryview(data)[written:], written)
                self.fs.fsync(fd)
            finally:
                self.fs.close(fd)
            self.fs.replace(tmp, target)
        except BaseException:
            try:
                self.fs.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self.fs.fsync_dir(self.dir)
