"""Freeing the shared memory of a stopped daemon: its slot files in the shm directory.

Slots outlive the daemon on purpose: a daemon restarted on the same root re-adopts the shards
they hold (a trainer that crashed with the daemon restores from RAM). Nothing else frees them, so
an operator who is done with a node frees them here: at a clean stop with
``daemon.release_memory_on_exit`` (the daemon calls ``release_slots`` after it closed its
mappings) or with ``ckptctl --root DIR release-memory`` while no daemon serves the root.

Rules, per slot file ``slot-<id>.bin`` (and its sidecar ``.meta.json``):

* no valid sidecar (empty, torn, a spare): it holds nothing; freed;
* a shard of this node whose step is committed on this root's disk tier (its manifest parses and
  lists that rank with the same size): durable; freed;
* anything else (a step not on disk, a replica of another node's shard): kept, unless ``force``.

The directory itself is removed when nothing is left in it. Only the daemon that owns the
directory, or an operator holding the root's lock, may call this: it is not safe beside a live
daemon. ``dry_run`` reports the same plan and touches nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ckptd.core.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from ckptd.core.types import step_dirname, validate_job, validate_step

log = logging.getLogger("ckptd.shm")

SLOT_PREFIX: Final = "slot-"
SLOT_SUFFIX: Final = ".bin"
META_SUFFIX: Final = ".meta.json"
MAX_SIDECAR_BYTES: Final = 64 * 2**20


@dataclass
class ReleaseReport:
    shm_dir: str
    freed: list[dict[str, Any]] = field(default_factory=list)  # {"slot", "bytes", "job", "step", "rank", "why"}
    kept: list[dict[str, Any]] = field(default_factory=list)
    dir_removed: bool = False

    @property
    def freed_bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.freed)

    @property
    def kept_bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.kept)


def _sidecar(meta_path: Path) -> dict[str, Any] | None:
    try:
        with open(meta_path, "rb") as f:
            raw = f.read(MAX_SIDECAR_BYTES + 1)
        meta = json.loads(raw) if len(raw) <= MAX_SIDECAR_BYTES else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _on_disk(data_dir: Path | None, job: str, step: int, rank: int, nbytes: int) -> bool:
    """Whether ``job@step`` rank ``rank`` (``nbytes``) is committed in the disk tier at ``data_dir``."""
    if data_dir is None:
        return False
    path = data_dir / validate_job(job) / step_dirname(validate_step(step)) / MANIFEST_NAME
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        manifest = Manifest.from_json(raw)
    except (OSError, ValueError):
        return False
    return any(s.rank == rank and s.nbytes == nbytes for s in manifest.shards)


def _classify(data_dir: Path | None, meta: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    """(what the slot holds, why it may be freed or None when it must be kept)."""
    if meta is None:
        return {}, "holds no shard"
    try:
        job, step = str(meta["job"]), int(meta["step"])
        shard = meta["shard"]
        rank, nbytes = int(shard["rank"]), int(shard["nbytes"])
    except (KeyError, TypeError, ValueError):
        return {}, "holds no shard"
    held = {"job": job, "step": step, "rank": rank}
    if meta.get("replica_of"):
        return {**held, "replica_of": str(meta["replica_of"])}, None
    try:
        durable = _on_disk(data_dir, job, step, rank, nbytes)
    except ValueError:  # a name or step no daemon would have written
        durable = False
    return held, "durable on disk" if durable else None


def release_slots(shm_dir: Path, data_dir: Path | None, force: bool = False, dry_run: bool = False) -> ReleaseReport:
    """Free the slot files of ``shm_dir`` that hold nothing or a shard durable in the disk tier at
    ``data_dir`` (every slot with ``force``); see the module docstring. Blocking."""
    report = ReleaseReport(str(shm_dir))
    try:
        entries = sorted(shm_dir.iterdir())
    except FileNotFoundError:
        return report
    for entry in entries:
        name = entry.name
        if not (name.startswith(SLOT_PREFIX) and name.endswith(SLOT_SUFFIX)):
            continue
        meta_path = entry.with_name(name[: -len(SLOT_SUFFIX)] + META_SUFFIX)
        try:
            size = entry.stat().st_size
        except FileNotFoundError:
            continue
        held, why = _classify(data_dir, _sidecar(meta_path))
        row = {"slot": name, "bytes": size, **held}
        if why is None and not force:
            row["why"] = "a replica of another node's shard" if "replica_of" in held else "not durable on disk"
            report.kept.append(row)
            continue
        row["why"] = why or "forced"
        report.freed.append(row)
        if not dry_run:
            meta_path.unlink(missing_ok=True)
            entry.unlink(missing_ok=True)
    if not dry_run and not report.kept:
        for leftover in shm_dir.iterdir():  # orphan sidecars and temp files: nothing left to adopt
            if leftover.is_file() and not leftover.is_symlink():
                leftover.unlink(missing_ok=True)
        try:
            shm_dir.rmdir()
            report.dir_removed = True
        except OSError:
            pass
    return report


def release_on_exit(shm_dir: Path, data_dir: Path | None, mode: str) -> ReleaseReport | None:
    """``daemon.release_memory_on_exit`` at a clean stop: "off" does nothing, "durable" frees the
    slots whose shards are durable on disk, "force" frees every slot. Logs what it did."""
    if mode == "off":
        return None
    try:
        report = release_slots(shm_dir, data_dir, force=mode == "force")
    except OSError as exc:
        log.warning("releasing shared memory in %s failed: %s", shm_dir, exc)
        return None
    log.info("released %d slot(s) (%d bytes) in %s; kept %d (%d bytes) not durable on disk",
             len(report.freed), report.freed_bytes, shm_dir, len(report.kept), report.kept_bytes)
    return report
