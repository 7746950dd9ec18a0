"""``ckptctl verify``: check a step's copies, tier by tier, and name every bad one.

Without ``--read-data`` it checks manifest consistency only: the manifest parses and validates,
and every shard the manifest lists is present (disk: the file exists with the recorded size;
memory: the daemon plans a memory slot for it). With ``--read-data`` it re-reads every byte and
checks every crc32c chunk sum: disk files are streamed chunk by chunk from the disk root (``--root``,
or the daemon's own root as DaemonStatus reports it) and every bad chunk is listed; a memory copy
is leased through PrepareRestore (the daemon checks it and falls back to disk when it is bad,
naming the rejected slot), then mapped read-only and checked again here. With ``--bucket``, shard
objects are checked the same way (presence and size by HEAD; ``--read-data`` reads every object
and checks every chunk), and a bad copy is named by its ``s3://bucket/key``.

Statuses: ``ok``; ``bad`` (checksum, size or manifest mismatch) and ``missing`` (a shard of a
committed step is gone) are integrity failures, exit 5; ``absent`` (a memory copy already
evicted) and ``error`` (could not be checked, e.g. an I/O error) make the result partial, exit 3.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import CkptdError, IntegrityError, InvalidArgument, NotFound
from ckptd.core.integrity import crc32c
from ckptd.core.manifest import MANIFEST_NAME, Manifest, ShardEntry
from ckptd.ctl.model import Identity
from ckptd.ctl.output import Progress, emit_json, human_bytes, message, render_table
from ckptd.ctl.source import DaemonSource, DiskSource, _map_readonly

if TYPE_CHECKING:
    from ckptd.ctl.bucket import ObjectSource
    from ckptd.ctl.source import AnySource

READ_BLOCK_BYTES = 8 * 2**20
MAX_LISTED_CHUNKS = 16
BAD = ("bad", "missing")
PARTIAL = ("absent", "error")


@dataclass
class Check:
    """The verdict on one copy: a manifest (rank None) or one rank's shard at one tier."""

    tier: str
    rank: int | None
    location: str
    status: str
    detail: str = ""
    nbytes_read: int = 0

    def __post_init__(self) -> None:
        if self.location and self.detail.startswith(self.location + ": "):
            self.detail = self.detail[len(self.location) + 2 :]  # the location is its own field

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "rank": self.rank, "location": self.location, "status": self.status,
                "detail": self.detail, "nbytes_read": self.nbytes_read}


def _chunks_ok(entry: ShardEntry) -> str:
    n = len(entry.chunk_crc32c)
    return f"crc32c ok ({n} chunk{'s' if n != 1 else ''})"


def _chunk_list(bad: list[int], chunk_bytes: int) -> str:
    shown = ", ".join(f"{i} (offset {i * chunk_bytes})" for i in bad[:MAX_LISTED_CHUNKS])
    more = f" and {len(bad) - MAX_LISTED_CHUNKS} more" if len(bad) > MAX_LISTED_CHUNKS else ""
    return f"crc32c mismatch in chunk {shown}{more}"


def scan_file(path: Path, entry: ShardEntry, bar: Progress) -> tuple[list[int], int]:
    """Stream a shard file and return (indexes of chunks whose crc32c differs, bytes read)."""
    cb = entry.chunk_bytes
    block = max(1, READ_BLOCK_BYTES // cb) * cb
    buf = bytearray(block)
    view = memoryview(buf)
    bad: list[int] = []
    pos = 0
    with open(path, "rb", buffering=0) as f:
        while pos < entry.nbytes:
            want = min(block, entry.nbytes - pos)
            got = 0
            while got < want:
                n = f.readinto(view[got:want])
                if not n:
                    raise IntegrityError(f"{path}: truncated at {pos + got} of {entry.nbytes} bytes")
                got += n
            for off in range(0, got, cb):
                idx = (pos + off) // cb
                if crc32c(view[off : min(off + cb, got)]) != entry.chunk_crc32c[idx]:
                    bad.append(idx)
            pos += got
            bar.advance(got)
    return bad, pos


def check_slot(path: str, entry: ShardEntry, bar: Progress) -> list[int]:
    """Check a memory slot's bytes against the manifest (mapped read-only)."""
    mm = _map_readonly(path, entry.nbytes)
    if mm is None:
        return []
    bad: list[int] = []
    cb = entry.chunk_bytes
    view = memoryview(mm)
    try:
        for idx, off in enumerate(range(0, entry.nbytes, cb)):
            if crc32c(view[off : min(off + cb, entry.nbytes)]) != entry.chunk_crc32c[idx]:
                bad.append(idx)
            bar.advance(min(cb, entry.nbytes - off))
    finally:
        view.release()
        mm.close()
    return bad


def _shard_facts(m: Manifest) -> list[tuple[object, ...]]:
    """What two tiers' manifests of one step must agree on (not tier-specific fields like object keys)."""
    return sorted((s.rank, s.key, s.nbytes, s.chunk_bytes, s.chunk_crc32c, s.tensors) for s in m.shards)


def verify_disk(source: DaemonSource | DiskSource, manifest: Manifest, read_data: bool, bar: Progress) -> list[Check]:
    tier = source.disk_tier()
    if tier is None:
        raise NotFound("the daemon has no disk tier")
    step_dir = tier.step_dir(manifest.job, manifest.step)
    checks: list[Check] = []
    mpath = str(step_dir / MANIFEST_NAME)
    try:
        disk_manifest = tier.read_manifest(manifest.job, manifest.step)
    except IntegrityError as exc:
        return [Check("disk", None, mpath, "bad", str(exc))]
    except NotFound as exc:
        return [Check("disk", None, mpath, "missing", str(exc))]
    except CkptdError as exc:
        return [Check("disk", None, mpath, "error", str(exc))]
    if _shard_facts(disk_manifest) != _shard_facts(manifest):
        checks.append(Check("disk", None, mpath, "bad", "disk manifest differs from the daemon's manifest"))
    else:
        checks.append(Check("disk", None, mpath, "ok", "manifest valid"))
    for entry in sorted(disk_manifest.shards, key=lambda s: s.rank):
        path = tier.shard_path(manifest.job, manifest.step, entry)
        bar.set_detail(f"disk rank {entry.rank}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            checks.append(Check("disk", entry.rank, str(path), "missing", "shard file is missing"))
            bar.advance(entry.nbytes)
            continue
        except OSError as exc:
            checks.append(Check("disk", entry.rank, str(path), "error", str(exc)))
            bar.advance(entry.nbytes)
            continue
        if size != entry.nbytes:
            checks.append(Check("disk", entry.rank, str(path), "bad",
                                f"size {size} != {entry.nbytes} recorded in the manifest"))
            bar.advance(entry.nbytes)
            continue
        if not read_data:
            checks.append(Check("disk", entry.rank, str(path), "ok", "present, size matches (data not read)"))
            continue
        try:
            bad, nread = scan_file(path, entry, bar)
        except IntegrityError as exc:
            checks.append(Check("disk", entry.rank, str(path), "bad", str(exc)))
            continue
        except OSError as exc:
            checks.append(Check("disk", entry.rank, str(path), "error", f"reading failed: {exc}"))
            continue
        if bad:
            checks.append(Check("disk", entry.rank, str(path), "bad", _chunk_list(bad, entry.chunk_bytes), nread))
        else:
            checks.append(Check("disk", entry.rank, str(path), "ok",
                                _chunks_ok(entry), nread))
    return checks


def _memory_rejection(rejected: list[str]) -> str | None:
    for r in rejected:
        if r.startswith("memory:"):
            return r.removeprefix("memory:").strip()
    return None


def verify_memory(source: DaemonSource, manifest: Manifest, read_data: bool, bar: Progress) -> list[Check]:
    checks: list[Check] = []
    conn = source.conn
    for entry in sorted(manifest.shards, key=lambda s: s.rank):
        bar.set_detail(f"memory rank {entry.rank}")
        plan = source.plan(manifest, entry.rank)
        slot = next((p.detail for p in plan if p.tier == "memory"), None)
        if slot is None:
            checks.append(Check("memory", entry.rank, "", "absent", "no memory copy (evicted or never staged)"))
            bar.advance(entry.nbytes)
            continue
        if not read_data:
            checks.append(Check("memory", entry.rank, slot, "ok", "present (data not read)"))
            continue
        try:
            resp = conn.call(conn.stub.PrepareRestore, pb.PrepareRestoreRequest(
                job=manifest.job, rank=entry.rank, world_size=manifest.world_size, step=manifest.step,
                client_pid=os.getpid()), timeout_s=source.read_timeout_s)
        except IntegrityError as exc:
            checks.append(Check("memory", entry.rank, slot, "bad", str(exc)))
            bar.advance(entry.nbytes)
            continue
        try:
            why = _memory_rejection(list(resp.rejected))
            if resp.served_from != "memory":
                status = "absent" if why is None or "evicted" in why else "bad"
                checks.append(Check("memory", entry.rank, slot, status, why or f"served from {resp.served_from}"))
                bar.advance(entry.nbytes)
                continue
            try:
                bad = check_slot(resp.slot_path, entry, bar)
            except (OSError, ValueError) as exc:
                checks.append(Check("memory", entry.rank, resp.slot_path, "error", f"mapping the slot failed: {exc}"))
                continue
            if bad:
                checks.append(Check("memory", entry.rank, resp.slot_path, "bad",
                                    _chunk_list(bad, entry.chunk_bytes), entry.nbytes))
            else:
                checks.append(Check("memory", entry.rank, resp.slot_path, "ok",
                                    _chunks_ok(entry), entry.nbytes))
        finally:
            conn.call(conn.stub.ReleaseRestore, pb.ReleaseRestoreRequest(lease_id=resp.lease_id))
    return checks


def verify_object(source: ObjectSource, manifest: Manifest, read_data: bool, bar: Progress) -> list[Check]:
    checks = [Check("object", None, source.manifest_url(manifest), "ok", "manifest valid")]
    for entry in sorted(manifest.shards, key=lambda s: s.rank):
        bar.set_detail(f"object rank {entry.rank}")
        try:
            url = source.shard_url(manifest, entry)
        except IntegrityError as exc:
            checks.append(Check("object", entry.rank, "", "bad", str(exc)))
            continue
        if not read_data:
            try:
                size = source.head_size(manifest, entry)
            except CkptdError as exc:
                checks.append(Check("object", entry.rank, url, "error", str(exc)))
                continue
            if size is None:
                checks.append(Check("object", entry.rank, url, "missing", "shard object is missing"))
            elif size != entry.nbytes:
                checks.append(Check("object", entry.rank, url, "bad", f"size {size} != {entry.nbytes} "
                                                                       "recorded in the manifest"))
            else:
                checks.append(Check("object", entry.rank, url, "ok", "present, size matches (data not read)"))
            continue
        try:
            with source.open_shard(manifest, entry):
                checks.append(Check("object", entry.rank, url, "ok", _chunks_ok(entry), entry.nbytes))
        except IntegrityError as exc:
            checks.append(Check("object", entry.rank, url, "bad", str(exc)))
        except NotFound as exc:
            checks.append(Check("object", entry.rank, url, "missing", str(exc)))
        except CkptdError as exc:
            checks.append(Check("object", entry.rank, url, "error", str(exc)))
        bar.advance(entry.nbytes)
    return checks


def run_verify(source: AnySource, ident: Identity, tier: str | None, read_data: bool,
               as_json: bool, progress_enabled: bool) -> int:
    if tier == "memory" and not isinstance(source, DaemonSource):
        raise InvalidArgument("--tier memory needs a daemon (it cannot be used with --root or --bucket)")
    if (tier == "object") != (source.kind == "object") and tier is not None:
        raise InvalidArgument("--tier object needs --bucket" if tier == "object"
                              else f"--tier {tier} cannot be used with --bucket")
    try:
        manifest, committed = source.manifest(ident)
    except IntegrityError as exc:  # a disk root whose manifest does not parse
        where = "object" if source.kind == "object" else "disk"
        manifest_checks = [Check(where, None, str(exc).split(": ", 1)[0], "bad", str(exc))]
        return _report(ident.job, ident.step, source, read_data, manifest_checks, as_json)
    if tier is not None:
        if tier not in committed:
            raise NotFound(f"{manifest.job}@{manifest.step} is not committed at tier {tier} "
                           f"(committed at: {', '.join(committed) or 'none'})")
        tiers = [tier]
    else:
        tiers = [t for t in ("memory", "disk", "object") if t in committed
                 and (t == "object") == (source.kind == "object")]
    total = manifest.nbytes * len(tiers) if read_data else 0
    checks: list[Check] = []
    with Progress(f"verify {manifest.job}@{manifest.step}", total, progress_enabled and read_data) as bar:
        for t in tiers:
            if t == "memory" and isinstance(source, DaemonSource):
                checks += verify_memory(source, manifest, read_data, bar)
            elif t == "disk" and isinstance(source, (DaemonSource, DiskSource)):
                checks += verify_disk(source, manifest, read_data, bar)
            elif t == "object" and not isinstance(source, (DaemonSource, DiskSource)):
                checks += verify_object(source, manifest, read_data, bar)
    return _report(manifest.job, manifest.step, source, read_data, checks, as_json)


def _report(job: str, step: int | None, source: AnySource, read_data: bool, checks: list[Check],
            as_json: bool) -> int:
    bad = [c for c in checks if c.status in BAD]
    partial = [c for c in checks if c.status in PARTIAL]
    ok = not bad and not partial
    nread = sum(c.nbytes_read for c in checks)
    if as_json:
        emit_json({"schema": "ckptctl.verify/v1", "source": source.describe(), "job": job, "step": step,
                   "read_data": read_data, "ok": ok, "nbytes_read": nread,
                   "bad_copies": [c.location for c in bad], "checks": [c.to_json() for c in checks]})
    else:
        render_table(["TIER", "RANK", "STATUS", "LOCATION", "DETAIL"],
                     [[c.tier, "manifest" if c.rank is None else c.rank, c.status.upper(), c.location or "-",
                       c.detail] for c in checks], right=(1,))
        what = "data and manifests" if read_data else "manifests and presence"
        print(f"verified {what} of {job}@{step}: {len(checks)} checks, {len(bad)} bad, "
              f"{len(partial)} unchecked, {human_bytes(nread)} read")
    for c in bad:
        message(f"integrity failure: {c.location}: {c.detail}")
    if bad:
        return IntegrityError.exit_code
    if partial:
        return 3
    return 0
