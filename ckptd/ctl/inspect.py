"""Read-only ``ckptctl`` commands: ``version``, ``status``, ``ls`` and ``show``.

None of them reads tensor bytes: ``show`` reads only the manifest (and, against a daemon, asks
for the dry-run restore plan of each rank to say where each shard lives).
"""

from __future__ import annotations

import platform
import struct
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ckptd import __version__
from ckptd.core.errors import CkptdError, DaemonUnavailable, NotFound
from ckptd.core.integrity import crc32c
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import step_dirname
from ckptd.ctl.model import Identity, StepRow
from ckptd.ctl.output import emit_json, human_bytes, message, render_fields, render_table
from ckptd.ctl.source import DaemonSource, DiskSource

if TYPE_CHECKING:
    from ckptd.ctl.source import AnySource

TIER_ORDER = ("memory", "disk", "peer", "object")


def _sorted_tiers(names: set[str]) -> list[str]:
    return sorted(names, key=lambda t: (TIER_ORDER.index(t) if t in TIER_ORDER else len(TIER_ORDER), t))


def _when(unix_s: float) -> str:
    if not unix_s:
        return "-"
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def crc_digest(entry: ShardEntry) -> str:
    """Fingerprint of a shard's checksums: crc32c of its chunk crc32c values packed as little-endian u32."""
    packed = struct.pack(f"<{len(entry.chunk_crc32c)}I", *entry.chunk_crc32c)
    return f"{crc32c(packed):08x}"


# -- version --------------------------------------------------------------------------------
def run_version(addr: str | None, timeout_s: float | None, as_json: bool, use_daemon: bool) -> int:
    """Client version, and the daemon's when one answers (never an error when none does)."""
    daemon: dict[str, str] | None = None
    if use_daemon:
        try:
            src = DaemonSource(addr, timeout_s)
            try:
                daemon = {"version": src.status().version, "address": src.address}
            finally:
                src.close()
        except DaemonUnavailable as exc:
            message(str(exc))
    if as_json:
        emit_json({"schema": "ckptctl.version/v1", "client": __version__, "python": platform.python_version(),
                   "daemon": daemon})
    else:
        print(f"ckptctl {__version__} (python {platform.python_version()})")
        print(f"daemon  {daemon['version']} at {daemon['address']}" if daemon else "daemon  -")
    return 0


# -- ls -------------------------------------------------------------------------------------
def collect_steps(source: AnySource, job: str | None) -> tuple[list[str], list[StepRow]]:
    jobs = [job] if job is not None else source.list_jobs()
    rows: list[StepRow] = []
    for j in jobs:
        try:
            rows += sorted(source.list_steps(j), key=lambda r: r.step)
        except NotFound:
            if job is not None:
                raise
    return jobs, rows


def run_ls(source: AnySource, job: str | None, as_json: bool) -> int:
    jobs, rows = collect_steps(source, job)
    if as_json:
        emit_json({"schema": "ckptctl.ls/v1", "source": source.describe(), "jobs": jobs,
                   "steps": [r.to_json() for r in rows]})
        if not rows and job is None:
            _hint_where(source)  # on stderr: the document keeps its schema
        return 0
    default = {"disk": {"disk"}, "object": {"object"}}.get(source.kind, {"memory", "disk"})
    tiers = _sorted_tiers({t for r in rows for t in r.tiers} or default)
    pins = any(r.pinned for r in rows)  # a PINNED column only when some step is pinned
    table = [[r.job, r.step, r.world_size or "-", human_bytes(r.nbytes) if r.committed else "-"]
             + [r.tiers.get(t, "-") for t in tiers] + ["yes" if r.committed else "no"]
             + (["yes" if r.pinned else "-"] if pins else []) for r in rows]
    render_table(["JOB", "STEP", "WORLD", "SIZE"] + [t.upper() for t in tiers] + ["COMMITTED"]
                 + (["PINNED"] if pins else []), table, right=(1, 2, 3))
    if not rows:
        message("no checkpoints found" if job is None else f"job {job!r} has no steps")
        if job is None:
            _hint_where(source)
    return 0


def _hint_where(source: AnySource) -> None:
    """An empty bucket listing: name the prefix listed and the prefixes that hold checkpoints."""
    from ckptd.ctl.bucket import ObjectSource

    if isinstance(source, ObjectSource):
        for line in source.empty_hint():
            message(line)


# -- show -----------------------------------------------------------------------------------
def shard_json(source: AnySource, manifest: Manifest, entry: ShardEntry,
               tensors: bool) -> dict[str, Any]:
    try:
        where = [{"tier": p.tier, "location": p.detail} for p in source.plan(manifest, entry.rank)]
    except CkptdError as exc:
        message(f"rank {entry.rank}: cannot plan sources: {exc}")
        where = []
    out: dict[str, Any] = {
        "rank": entry.rank, "key": entry.key, "nbytes": entry.nbytes, "tensor_count": len(entry.tensors),
        "chunk_bytes": entry.chunk_bytes, "chunks": len(entry.chunk_crc32c),
        "chunk_crc32c": list(entry.chunk_crc32c), "crc32c_digest": crc_digest(entry), "locations": where,
        "stored_bytes": entry.stored_bytes,
        "codecs": dict(Counter(c.codec for c in entry.chunks)) if entry.chunks else {"raw": len(entry.chunk_crc32c)},
    }
    if tensors:
        out["tensors"] = [t.to_json() for t in entry.tensors]
    return out


def storage_json(manifest: Manifest) -> dict[str, Any]:
    """What the step takes in its store: logical bytes, stored bytes (every chunk it references,
    compressed), the bytes of objects its own step stored (the rest is shared with older steps),
    the compression ratio and the fraction shared with older steps (deduplication). A manifest
    without chunk records stores its logical bytes."""
    own = f"/{step_dirname(manifest.step)}/"
    stored = sum(s.stored_bytes for s in manifest.shards)
    new = sum(c.stored_bytes for s in manifest.shards for c in s.chunks if own in "/" + c.object_key)
    new += sum(s.nbytes for s in manifest.shards if not s.chunks)
    return {"logical_bytes": manifest.nbytes, "stored_bytes": stored, "own_stored_bytes": new,
            "compression_ratio": round(manifest.nbytes / stored, 3) if stored else 1.0,
            "dedup_shared_fraction": round(1 - new / stored, 3) if stored else 0.0}


def run_show(source: AnySource, ident: Identity, tensors: bool, as_json: bool) -> int:
    manifest, committed = source.manifest(ident)
    shards = [shard_json(source, manifest, e, tensors) for e in sorted(manifest.shards, key=lambda s: s.rank)]
    storage = storage_json(manifest)
    if as_json:
        emit_json({"schema": "ckptctl.show/v1", "source": source.describe(), "job": manifest.job,
                   "step": manifest.step, "world_size": manifest.world_size, "nbytes": manifest.nbytes,
                   "created_unix_s": manifest.created_unix_s, "tiers": committed, "extra": manifest.extra,
                   "storage": storage, "shards": shards})
        return 0
    ratio = f"compression {storage['compression_ratio']}x, {storage['dedup_shared_fraction']:.0%} shared by dedup"
    render_fields([("job", manifest.job), ("step", manifest.step), ("world size", manifest.world_size),
                   ("size", f"{human_bytes(manifest.nbytes)} ({manifest.nbytes} bytes)"),
                   ("stored", f"{human_bytes(storage['stored_bytes'])} ({ratio}); "
                              f"{human_bytes(storage['own_stored_bytes'])} under this step"),
                   ("tensors", sum(s["tensor_count"] for s in shards)),
                   ("created", _when(manifest.created_unix_s)), ("committed at", ", ".join(committed) or "-")])
    print()
    rows = [[s["rank"], s["key"], human_bytes(s["nbytes"]), s["tensor_count"], s["chunks"], s["crc32c_digest"],
             " ".join(f"{w['tier']}:{w['location']}" for w in s["locations"]) or "-"] for s in shards]
    render_table(["RANK", "KEY", "SIZE", "TENSORS", "CHUNKS", "CRC DIGEST", "WHERE"], rows, right=(0, 2, 3, 4))
    if tensors:
        print()
        trows = [[s["rank"], t["name"], t["dtype"], "[" + ",".join(str(d) for d in t["shape"]) + "]",
                  human_bytes(t["nbytes"]), t["offset"]] for s in shards for t in s["tensors"]]
        render_table(["RANK", "TENSOR", "DTYPE", "SHAPE", "SIZE", "OFFSET"], trows, right=(0, 4, 5))
    return 0


# -- status ---------------------------------------------------------------------------------
def _job_summary(job: str, rows: list[StepRow], tiers: list[str]) -> dict[str, Any]:
    latest: dict[str, int | None] = {}
    for t in tiers:
        steps = [r.step for r in rows if r.tiers.get(t) == "committed"]
        latest[t] = max(steps) if steps else None
    staging = sum(1 for r in rows if r.tiers.get("memory") in ("pending", "in_progress"))
    to_disk = sum(1 for r in rows if r.tiers.get("disk") == "in_progress"
                  or (r.tiers.get("disk") == "pending" and r.tiers.get("memory") == "committed"))
    return {"job": job, "steps": len(rows), "latest": latest, "in_flight": {"staging": staging, "disk": to_disk}}


def run_status(source: AnySource, as_json: bool) -> int:
    doc: dict[str, Any] = {"schema": "ckptctl.status/v1", "source": source.describe(), "daemon": None,
                           "memory": None, "disk": None, "peers": [], "jobs": []}
    if isinstance(source, DaemonSource):
        st = source.status()
        tiers = list(st.tiers)
        doc["daemon"] = {"version": st.version, "address": source.address, "root": st.root,
                         "shm_dir": st.shm_dir, "draining": st.draining, "tiers": tiers}
        doc["memory"] = {"budget_bytes": st.budget_bytes, "bytes_in_use": st.slot_bytes_in_use,
                         "slots": st.slots}
        root = source.disk_root()
        if root is not None:
            doc["disk"] = {"root": str(root), **_usage(root)}
    elif isinstance(source, DiskSource):
        tiers = ["disk"]
        doc["disk"] = {"root": str(source.root), **source.usage()}
    else:
        tiers = ["object"]
    jobs, rows = collect_steps(source, None)
    for job in jobs:
        doc["jobs"].append(_job_summary(job, [r for r in rows if r.job == job], tiers))
    if doc["disk"] is not None:
        doc["disk"]["checkpoint_bytes"] = sum(r.nbytes for r in rows if r.tiers.get("disk") == "committed")
    if as_json:
        emit_json(doc)
        return 0
    fields: list[tuple[str, object]] = []
    if doc["daemon"] is not None:
        d, m = doc["daemon"], doc["memory"]
        fields += [("daemon", f"ckptd {d['version']} at {d['address']}" + (" (DRAINING)" if d["draining"] else "")),
                   ("root", d["root"]), ("tiers", ", ".join(d["tiers"])),
                   ("memory", f"{human_bytes(m['bytes_in_use'])} of {human_bytes(m['budget_bytes'])} in "
                              f"{m['slots']} slots ({d['shm_dir']})")]
    else:
        fields.append(("daemon", f"- (reading the {'disk root' if source.kind == 'disk' else 'bucket'} directly)"))
    if source.kind == "object":
        d = source.describe()
        at = f" at {d['endpoint']}" if d["endpoint"] else ""
        fields.append(("object", f"s3://{d['bucket']}/{d['prefix']}{at}"))
    if doc["disk"] is not None:
        k = doc["disk"]
        fields.append(("disk", f"{k['root']}: {human_bytes(k['checkpoint_bytes'])} of checkpoints, "
                               f"{human_bytes(k.get('free_bytes', 0))} free of {human_bytes(k.get('total_bytes', 0))}"))
    fields.append(("peers", "-"))
    render_fields(fields)
    print()
    table = [[j["job"], j["steps"]] + ["-" if j["latest"][t] is None else j["latest"][t] for t in tiers]
             + [j["in_flight"]["staging"], j["in_flight"]["disk"]] for j in doc["jobs"]]
    render_table(["JOB", "STEPS"] + [f"LATEST {t.upper()}" for t in tiers] + ["STAGING", "TO DISK"], table,
                 right=tuple(range(1, 4 + len(tiers))))
    return 0


def _usage(root: Any) -> dict[str, int]:
    import shutil

    try:
        u = shutil.disk_usage(root)
    except OSError:
        return {}
    return {"total_bytes": u.total, "used_bytes": u.used, "free_bytes": u.free}

