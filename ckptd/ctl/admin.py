"""``ckptctl gc``, ``rm`` and ``pin``/``unpin``: retention by hand.

* ``gc [JOB] [--tier T] [--dry-run]`` applies the retention policy now: per tier, keep the newest
  ``max_to_keep`` committed steps, every step divisible by ``keep_period``, every pinned step and
  always the newest; remove the rest. A daemon applies its own configured policy (RunRetention);
  with ``--root``/``--bucket`` the policy comes from ``--max-to-keep``/``--keep-period``
  (defaults: the daemon's defaults).
* ``rm JOB@STEP [--tier T] --yes [--force]`` removes a step's copy at one tier, or at every tier
  that holds it (DeleteStep against a daemon).
* ``pin``/``unpin JOB@STEP``: a pinned step is never removed by retention. The daemon keeps pins
  in ``{root}/pins/{job}.json`` across restarts; ``--root`` edits the same files. ``--bucket``
  has no pins (they live with a daemon or a disk root).

Neither ``rm`` nor ``gc`` ever removes the last committed copy of a pinned step or of the job's
latest step unless ``--force`` is given to ``rm`` (exit 1 with the reason otherwise). Changes to a
disk root take the root's ``ckptd.lock`` first, so they never race a daemon serving it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import CkptdError, InvalidArgument, NotFound
from ckptd.ctl.model import Identity
from ckptd.ctl.output import emit_json, message, render_table
from ckptd.ctl.source import DaemonSource, DiskSource
from ckptd.drains.retention import last_copy_refusal, select_for_deletion

if TYPE_CHECKING:
    from ckptd.ctl.bucket import ObjectSource
    from ckptd.ctl.source import AnySource

EXIT_FAILURE = 1


def _copy(job: str, step: int, tier: str) -> dict[str, Any]:
    return {"job": job, "step": step, "tier": tier}


def _local_tier(source: DiskSource | ObjectSource) -> str:
    return "disk" if isinstance(source, DiskSource) else "object"


def _pins(source: DiskSource | ObjectSource, job: str) -> set[int]:
    return source.pin_store().get(job) if isinstance(source, DiskSource) else set()


def _guard(source: DiskSource | ObjectSource) -> contextlib.AbstractContextManager[None]:
    return source.exclusive() if isinstance(source, DiskSource) else contextlib.nullcontext()


def _check_tier(source: AnySource, tier: str | None) -> None:
    if tier is not None and not isinstance(source, DaemonSource) and tier != _local_tier(source):
        where = "--root" if isinstance(source, DiskSource) else "--bucket"
        raise InvalidArgument(f"--tier {tier} cannot be used with {where} (it holds only the "
                              f"{_local_tier(source)} tier)")


def _report(rows: list[dict[str, Any]], dry_run: bool, problems: list[str], label: str, as_json: bool,
            doc: dict[str, Any]) -> int:
    if as_json:
        emit_json(doc)
    else:
        action = "would remove" if dry_run else "removed"
        if rows:
            render_table(["TIER", "JOB", "STEP", "ACTION"], [[r["tier"], r["job"], r["step"], action] for r in rows],
                         right=(2,))
        n = len(rows)
        print(f"{label}: {action} {n} cop{'y' if n == 1 else 'ies'}" + (" (dry run)" if dry_run else "")
              if n else f"{label}: {'removed nothing' if problems else 'nothing to remove'}")
    for p in problems:
        message(f"refused: {p}" if label == "rm" else f"error: {p}")
    return EXIT_FAILURE if problems else 0


# -- gc -------------------------------------------------------------------------------------
def run_gc(source: AnySource, job: str | None, tier: str | None, dry_run: bool, max_to_keep: int | None,
           keep_period: int | None, as_json: bool) -> int:
    _check_tier(source, tier)
    if tier == "memory":
        raise InvalidArgument("the memory tier has no retention policy (slots are reused by newer saves)")
    if isinstance(source, DaemonSource):
        if max_to_keep is not None or keep_period is not None:
            raise InvalidArgument("--max-to-keep/--keep-period apply to --root and --bucket; "
                                  "a daemon applies its configured policy")
        conn = source.conn
        resp = conn.call(conn.stub.RunRetention, pb.RunRetentionRequest(job=job or "", tier=tier or "",
                                                                         dry_run=dry_run))
        rows = [_copy(d.job, int(d.step), d.tier) for d in resp.deleted]
        errors = list(resp.errors)
        policies = {p.tier: {"max_to_keep": int(p.max_to_keep), "keep_period": int(p.keep_period)}
                    for p in resp.policies}
    else:
        rows, errors, policies = _gc_local(source, job, dry_run, max_to_keep, keep_period)
    if not as_json and policies:
        print("policy: " + "; ".join(f"{t} max_to_keep={p['max_to_keep']} keep_period={p['keep_period']}"
                                     for t, p in policies.items()))
    doc = {"schema": "ckptctl.gc/v1", "source": source.describe(), "job": job, "dry_run": dry_run,
           "policies": policies, "deleted": rows, "errors": errors}
    return _report(rows, dry_run, errors, "gc", as_json, doc)


def _gc_local(source: DiskSource | ObjectSource, job: str | None, dry_run: bool, max_to_keep: int | None,
              keep_period: int | None) -> tuple[list[dict[str, Any]], list[str], dict[str, dict[str, int]]]:
    from ckptd.core.config import DiskSection, ObjectSection
    from ckptd.drains import retention_record

    t = _local_tier(source)
    defaults: DiskSection | ObjectSection | retention_record.DiskPolicy
    defaults = DiskSection() if t == "disk" else ObjectSection()
    record = retention_record.path_for_data(source.root) if isinstance(source, DiskSource) else None
    if record is not None:
        defaults = retention_record.read(record) or defaults  # what the root's daemon applies
    keep = defaults.max_to_keep if max_to_keep is None else max_to_keep
    period = defaults.keep_period if keep_period is None else keep_period
    if t == "object":
        message("note: --bucket sees no pins (they are kept by daemons and disk roots)")
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    # a dry run changes nothing: it needs no lock and may run beside the daemon serving the root
    with contextlib.nullcontext() if dry_run else _guard(source):
        if job is not None:
            source.committed(job)  # NotFound (exit 4) for an unknown job
        for j in [job] if job is not None else source.list_jobs():
            try:
                committed = source.committed(j)
            except CkptdError as exc:
                errors.append(f"{t}: cannot list the steps of {j}: {exc}")
                continue
            for s in select_for_deletion(committed, keep, period, _pins(source, j)):
                if not dry_run:
                    try:
                        source.tier.delete(j, s)
                    except (CkptdError, OSError) as exc:
                        errors.append(f"{t}: removing {j}@{s} failed: {exc}")
                        continue
                rows.append(_copy(j, s, t))
            if t == "object" and not dry_run:
                _sweep_object(source, j, errors)
    return rows, errors, {t: {"max_to_keep": keep, "keep_period": period}}


def _sweep_object(source: DiskSource | ObjectSource, job: str, errors: list[str]) -> None:
    """Mark-and-sweep the job's objects: what no committed step references and no live upload
    may still write (older than the tier's stale-upload age) goes."""
    if isinstance(source, DiskSource):
        return
    try:
        swept = source.tier.sweep(job, older_than_s=source.tier.stale_upload_age_s)
    except CkptdError as exc:
        errors.append(f"object: sweeping {job} failed: {exc}")
        return
    if swept:
        message(f"object: removed {len(swept)} unreferenced object(s) of {job}")


# -- rm -------------------------------------------------------------------------------------
def run_rm(source: AnySource, ident: Identity, tier: str | None, force: bool, dry_run: bool,
           as_json: bool) -> int:
    if ident.step is None:
        raise InvalidArgument(f"rm needs an explicit step ({ident.job}@STEP), not {ident}")
    _check_tier(source, tier)
    job, step = ident.job, ident.step
    if isinstance(source, DaemonSource):
        conn = source.conn
        resp = conn.call(conn.stub.DeleteStep, pb.DeleteStepRequest(job=job, step=step, tier=tier or "",
                                                                     force=force, dry_run=dry_run))
        rows = [_copy(d.job, int(d.step), d.tier) for d in resp.deleted]
        refused = list(resp.refused)
    else:
        rows, refused = _rm_local(source, job, step, force, dry_run)
    doc = {"schema": "ckptctl.rm/v1", "source": source.describe(), "job": job, "step": step, "tier": tier,
           "dry_run": dry_run, "force": force, "deleted": rows, "refused": refused}
    return _report(rows, dry_run, refused, "rm", as_json, doc)


def _rm_local(source: DiskSource | ObjectSource, job: str, step: int, force: bool,
              dry_run: bool) -> tuple[list[dict[str, Any]], list[str]]:
    t = _local_tier(source)
    with _guard(source):
        committed = source.committed(job)
        if step not in committed:
            raise NotFound(f"{job}@{step} is not committed at the {t} tier")
        if t == "object":
            message("note: --bucket sees no pins (they are kept by daemons and disk roots)")
        refusal = last_copy_refusal(job, step, {s: {t} for s in committed}, {t}, _pins(source, job))
        if refusal is not None and not force:
            return [], [refusal]
        if not dry_run:
            source.tier.delete(job, step)
            if isinstance(source, DiskSource) and step in _pins(source, job):
                source.pin_store().change(job, step, False)  # no copy left: drop its pin
    return [_copy(job, step, t)], []


# -- pin / unpin ----------------------------------------------------------------------------
def run_pin(source: AnySource, ident: Identity, pinned: bool, as_json: bool) -> int:
    if not isinstance(source, (DaemonSource, DiskSource)):
        raise InvalidArgument("pins are kept by a daemon or a disk root: use --addr or --root, not --bucket")
    job, step = ident.job, ident.step
    if step is None:  # JOB@latest: the newest committed step now
        step = source.manifest(ident)[0].step
    if isinstance(source, DaemonSource):
        conn = source.conn
        resp = conn.call(conn.stub.PinStep, pb.PinStepRequest(job=job, step=step, pinned=pinned))
        pins = [int(s) for s in resp.pinned_steps]
    else:
        with source.exclusive():
            if pinned and step not in source.committed(job):
                raise NotFound(f"{job}@{step} is not committed at the disk tier")
            pins = source.pin_store().change(job, step, pinned)
    if as_json:
        emit_json({"schema": "ckptctl.pin/v1", "source": source.describe(), "job": job, "step": step,
                   "pinned": pinned, "pins": pins})
    else:
        shown = ", ".join(str(s) for s in pins) or "none"
        print(f"{'pinned' if pinned else 'unpinned'} {job}@{step} (pinned steps of {job}: {shown})")
    return 0


# -- release-memory -------------------------------------------------------------------------
def run_release_memory(root: Path, shm_dir: Path | None, force: bool, dry_run: bool, as_json: bool) -> int:
    """Free the shm slots a stopped daemon of ``root`` left (ckptd/memory/release.py): those that
    hold nothing or a shard committed on the root's disk tier, or all with ``force``."""
    import fcntl
    import os

    from ckptd.core.config import Config, DaemonSection
    from ckptd.core.errors import FailedPrecondition
    from ckptd.ctl.output import human_bytes
    from ckptd.memory.release import release_slots

    lock = root / "ckptd.lock"
    if not lock.is_file():
        raise NotFound(f"--root {root}: not a ckptd daemon root (no ckptd.lock)")
    shm = shm_dir if shm_dir is not None else Config(daemon=DaemonSection(root=root)).shm_path
    fd = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPrecondition(f"a ckptd daemon is serving {root} (it holds {lock}); its slots are in "
                                     "use: stop it first (or start it with --release-memory-on-exit)") from None
        data = root / "data"
        report = release_slots(shm, data if data.is_dir() else None, force=force, dry_run=dry_run)
    finally:
        os.close(fd)
    if as_json:
        emit_json({"schema": "ckptctl.release-memory/v1", "root": str(root), "shm_dir": str(shm),
                   "dry_run": dry_run, "force": force, "freed": report.freed, "kept": report.kept,
                   "freed_bytes": report.freed_bytes, "kept_bytes": report.kept_bytes,
                   "dir_removed": report.dir_removed})
    else:
        rows = [[("would free" if dry_run else "freed") if r in report.freed else "kept", r["slot"],
                 human_bytes(r["bytes"]), f"{r['job']}@{r['step']} rank {r['rank']}" if "job" in r else "-", r["why"]]
                for r in report.freed + report.kept]
        if rows:
            render_table(["ACTION", "SLOT", "SIZE", "HOLDS", "WHY"], rows, right=(2,))
        verb = "would free" if dry_run else "freed"
        message(f"{verb} {len(report.freed)} slot(s), {human_bytes(report.freed_bytes)} in {shm}"
                + (f"; kept {len(report.kept)} ({human_bytes(report.kept_bytes)}) whose shards are not durable "
                   "on disk (--force frees them too)" if report.kept else ""))
    return 0
