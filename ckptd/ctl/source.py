"""Where ``ckptctl`` reads checkpoints from: a running daemon, a bare disk root, or a bucket.

``DaemonSource`` talks to the node's daemon over its Unix socket (address as in
``ckptd_client.rpc``); ``DiskSource`` reads ``{root}/{job}/step-NNNNNNNNNNNN/`` directly
through ``ckptd.tiers.disk.DiskTier`` (imported lazily, so ``import ckptd_client`` stays light),
for an operator on a machine that runs no daemon; ``ckptctl_bucket.ObjectSource`` reads an
object store. All answer the same questions: jobs, steps with their per-tier state, a step's
manifest, the per-shard source plan, and a shard's bytes (verified against its crc32c chunk sums
before they are handed out). Identities ``JOB@STEP``, ``JOB@latest`` and ``JOB`` are parsed here
too.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import shutil
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from ckptd_client.rpc import Connection

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.errors import DaemonUnavailable, FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from ckptd.core.manifest import MANIFEST_NAME, Manifest, ShardEntry
from ckptd.core.types import parse_step_dirname, validate_job, validate_step

if TYPE_CHECKING:
    from ckptd.ctl.bucket import BucketTarget, ObjectSource
    from ckptd.drains.pins import PinStore
    from ckptd.tiers.disk import DiskTier

CONNECT_TIMEOUT_S = 3.0
RPC_TIMEOUT_S = 60.0
READ_RPC_TIMEOUT_S = 600.0  # PrepareRestore that reads a shard

#: Names of TierState values as ckptctl prints them (the protobuf enum, lower case).
TIER_STATE_NAMES: dict[int, str] = {
    pb.TIER_STATE_UNSPECIFIED: "pending",
    pb.TIER_PENDING: "pending",
    pb.TIER_IN_PROGRESS: "in_progress",
    pb.TIER_COMMITTED: "committed",
    pb.TIER_FAILED: "failed",
    pb.TIER_SKIPPED: "skipped",
    pb.TIER_REMOVED: "removed",
}

_STEP_RE = re.compile(r"[0-9]+", re.ASCII)


@dataclass(frozen=True)
class Identity:
    """``JOB@STEP``; ``step`` is None for ``JOB@latest`` and a bare ``JOB``."""

    job: str
    step: int | None

    def __str__(self) -> str:
        return f"{self.job}@{'latest' if self.step is None else self.step}"


def parse_identity(text: str) -> Identity:
    """Parse ``JOB@STEP``, ``JOB@latest`` or ``JOB``; raise InvalidArgument (exit 2) otherwise."""
    job, sep, step_text = text.partition("@")
    try:
        validate_job(job)
    except ValueError as exc:
        raise InvalidArgument(f"bad identity {text!r}: {exc}") from None
    if not sep or step_text == "latest":
        if sep and not step_text:
            raise InvalidArgument(f"bad identity {text!r}: empty step")
        return Identity(job, None)
    if not _STEP_RE.fullmatch(step_text):
        raise InvalidArgument(f"bad identity {text!r}: step must be a non-negative integer or 'latest'")
    try:
        return Identity(job, validate_step(int(step_text)))
    except ValueError as exc:
        raise InvalidArgument(f"bad identity {text!r}: {exc}") from None


@dataclass
class StepRow:
    """One step as ``ls`` shows it."""

    job: str
    step: int
    world_size: int
    nbytes: int
    committed: bool
    tiers: dict[str, str] = field(default_factory=dict)
    pinned: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "step": self.step, "world_size": self.world_size, "nbytes": self.nbytes,
                "committed": self.committed, "tiers": dict(self.tiers), "pinned": self.pinned}


@dataclass
class Planned:
    """One source of a shard in the order it would be tried."""

    tier: str
    detail: str


@dataclass
class ShardData:
    """A shard's verified bytes, valid inside ``Source.open_shard``'s ``with`` block."""

    buf: memoryview
    served_from: str
    location: str
    rejected: list[str] = field(default_factory=list)


def _disk_tier(root: Path) -> DiskTier:
    from ckptd.tiers.disk import DiskTier  # lazy: the daemon's tier code only when needed

    return DiskTier(root, direct_io=False)


def resolve_root(path: Path) -> Path:
    """Accept a daemon root (with ``data/``) or the disk tier's data directory itself."""
    if not path.is_dir():
        raise NotFound(f"--root {path}: no such directory")
    data = path / "data"
    if (path / "ckptd.lock").exists():
        return data
    if data.is_dir() and not any(parse_step_dirname(p.name) is not None for p in data.iterdir()):
        return data  # data/ holds jobs, not steps: path is a daemon root
    return path


# -- daemon ---------------------------------------------------------------------------------
def _probe_unix(path: str) -> str | None:
    """Fail fast on a missing socket or one nobody listens on (a stale file); None if it accepts."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT_S)
    try:
        sock.connect(path)
    except FileNotFoundError:
        return "socket missing"
    except ConnectionRefusedError:
        return "nothing listens on the socket"
    except PermissionError:
        return "permission denied"
    except TimeoutError:
        return None  # busy rather than absent: let gRPC's own wait decide
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        sock.close()
    return None


class DaemonSource:
    """A running daemon, over its Unix socket."""

    kind = "daemon"

    def __init__(self, addr: str | None, timeout_s: float | None = None) -> None:
        """``timeout_s``: the deadline of every call; None means 60 s, and 600 s for shard reads."""
        self.conn = Connection(addr, timeout_s=timeout_s or RPC_TIMEOUT_S)
        self.read_timeout_s = timeout_s or READ_RPC_TIMEOUT_S
        self.address = self.conn.address
        self._status: pb.DaemonStatusResponse | None = None
        path = self.address.removeprefix("unix:") if self.address.startswith("unix:") else None
        if path is not None:
            problem = _probe_unix(path)
            if problem is not None:
                self.conn.close()
                raise DaemonUnavailable(f"no ckptd daemon at {self.address} ({problem}; "
                                        "use --addr, CKPTD_ADDR or --root)")
        try:
            self.conn.wait_ready(CONNECT_TIMEOUT_S)
        except DaemonUnavailable:
            self.conn.close()
            raise DaemonUnavailable(f"no ckptd daemon answers at {self.address} "
                                    "(use --addr, CKPTD_ADDR or --root)") from None

    def describe(self) -> dict[str, Any]:
        return {"kind": "daemon", "address": self.address}

    def status(self) -> pb.DaemonStatusResponse:
        if self._status is None:
            self._status = self.conn.call(self.conn.stub.DaemonStatus, pb.DaemonStatusRequest())
        return self._status

    def list_jobs(self) -> list[str]:
        return list(self.conn.call(self.conn.stub.ListJobs, pb.ListJobsRequest()).jobs)

    def list_steps(self, job: str) -> list[StepRow]:
        resp = self.conn.call(self.conn.stub.ListSteps, pb.ListStepsRequest(job=job))
        return [StepRow(job, int(s.step), int(s.world_size), int(s.nbytes), bool(s.committed),
                        {t.tier: TIER_STATE_NAMES.get(int(t.state), "pending") for t in s.tiers}, bool(s.pinned))
                for s in resp.steps]

    def manifest(self, ident: Identity) -> tuple[Manifest, list[str]]:
        resp = self.conn.call(self.conn.stub.GetManifest, pb.GetManifestRequest(
            job=ident.job, step=-1 if ident.step is None else ident.step))
        try:
            return Manifest.from_json(resp.manifest_json), list(resp.tiers)
        except ValueError as exc:
            raise IntegrityError(f"the daemon's manifest of {ident} is invalid: {exc}") from None

    def plan(self, manifest: Manifest, rank: int) -> list[Planned]:
        resp = self.conn.call(self.conn.stub.PrepareRestore, pb.PrepareRestoreRequest(
            job=manifest.job, rank=rank, world_size=manifest.world_size, step=manifest.step, dry_run=True))
        key = manifest.shard(rank).key
        out = []
        for p in resp.plan:
            detail = p.detail
            if p.tier == "disk" and detail and not detail.endswith(key):
                detail = os.path.join(detail, key)  # the step directory -> the shard file
            out.append(Planned(p.tier, detail))
        return out

    def disk_root(self) -> Path | None:
        st = self.status()
        return Path(st.root) / "data" if "disk" in st.tiers else None

    def disk_tier(self) -> DiskTier | None:
        root = self.disk_root()
        return _disk_tier(root) if root is not None else None

    @contextmanager
    def open_shard(self, manifest: Manifest, entry: ShardEntry) -> Iterator[ShardData]:
        """Lease the shard through PrepareRestore (the daemon verifies crc32c) and map it read-only."""
        resp = self.conn.call(self.conn.stub.PrepareRestore, pb.PrepareRestoreRequest(
            job=manifest.job, rank=entry.rank, world_size=manifest.world_size, step=manifest.step,
            client_pid=os.getpid()), timeout_s=self.read_timeout_s)
        try:
            if resp.nbytes != entry.nbytes:
                raise IntegrityError(f"{manifest.job}@{manifest.step} rank {entry.rank}: the daemon served "
                               f"{resp.nbytes} bytes, the manifest says {entry.nbytes}")
            mm = _map_readonly(resp.slot_path, entry.nbytes)
            view = memoryview(mm)[: entry.nbytes] if mm is not None else memoryview(b"")
            try:
                yield ShardData(view, resp.served_from, resp.slot_path, list(resp.rejected))
            finally:
                view.release()
                if mm is not None:
                    try:
                        mm.close()
                    except BufferError:  # a caller kept a view; the GC unmaps it later
                        warnings.warn("slot mapping still referenced", ResourceWarning, stacklevel=1)
        finally:
            self.conn.call(self.conn.stub.ReleaseRestore, pb.ReleaseRestoreRequest(lease_id=resp.lease_id))

    def close(self) -> None:
        self.conn.close()


def _map_readonly(path: str, nbytes: int) -> mmap.mmap | None:
    if nbytes == 0:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


# -- disk root ------------------------------------------------------------------------------
class DiskSource:
    """The disk tier's files, read directly (no daemon needed)."""

    kind = "disk"

    def __init__(self, root: Path) -> None:
        self.given = root
        self.root = resolve_root(root)
        self.tier = _disk_tier(self.root)

    def describe(self) -> dict[str, Any]:
        return {"kind": "disk", "root": str(self.root)}

    def list_jobs(self) -> list[str]:
        return self.tier.list_jobs()

    def _job_dir(self, job: str) -> Path:
        job_dir = self.root / validate_job(job)
        if not job_dir.is_dir():
            raise NotFound(f"unknown job {job!r} under {self.root}")
        return job_dir

    def pin_store(self) -> PinStore:
        """The pins of this root (``{daemon root}/pins``, as the daemon keeps them)."""
        from ckptd.drains.pins import PinStore, pins_dir_for_data

        store = PinStore(pins_dir_for_data(self.root))
        store.load()
        return store

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the daemon root's ``ckptd.lock`` while changing the root: no daemon may serve it
        meanwhile (its catalog and pins would disagree with the files)."""
        lock = self.root.parent / "ckptd.lock" if self.root.name == "data" else None
        if lock is None or not lock.exists():
            yield
            return
        fd = os.open(lock, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FailedPrecondition(f"a ckptd daemon is serving {self.root.parent} (it holds {lock}); "
                                         "run this against the daemon (--addr) instead of --root") from None
            yield
        finally:
            os.close(fd)

    def list_steps(self, job: str) -> list[StepRow]:
        pins = self.pin_store().get(job)
        rows = []
        for p in self._job_dir(job).iterdir():
            step = parse_step_dirname(p.name)
            if step is None or not p.is_dir():
                continue
            if not (p / MANIFEST_NAME).is_file():
                rows.append(StepRow(job, step, 0, 0, False, {"disk": "uncommitted"}))
                continue
            try:
                m = self.tier.read_manifest(job, step)
            except (IntegrityError, NotFound):
                rows.append(StepRow(job, step, 0, 0, False, {"disk": "invalid"}))
                continue
            rows.append(StepRow(job, step, m.world_size, m.nbytes, True, {"disk": "committed"}))
        for r in rows:
            r.pinned = r.step in pins
        return sorted(rows, key=lambda r: r.step)

    def committed(self, job: str) -> list[int]:
        """Committed steps of job, oldest first; NotFound when the root has no such job."""
        self._job_dir(job)
        return self.tier.list_committed(job)

    def manifest(self, ident: Identity) -> tuple[Manifest, list[str]]:
        self._job_dir(ident.job)
        step = ident.step
        if step is None:
            steps = self.tier.list_committed(ident.job)
            if not steps:
                raise NotFound(f"no committed step of job {ident.job!r} under {self.root}")
            step = steps[-1]
        return self.tier.read_manifest(ident.job, step), ["disk"]

    def plan(self, manifest: Manifest, rank: int) -> list[Planned]:
        entry = manifest.shard(rank)
        return [Planned("disk", str(self.tier.shard_path(manifest.job, manifest.step, entry)))]

    def disk_tier(self) -> DiskTier:
        return self.tier

    @contextmanager
    def open_shard(self, manifest: Manifest, entry: ShardEntry) -> Iterator[ShardData]:
        """Read the shard file into a buffer with DiskTier.read_shard_into (size and crc32c checked)."""
        buf = bytearray(entry.nbytes)
        view = memoryview(buf)
        self.tier.read_shard_into(manifest.job, manifest.step, entry, view)
        path = str(self.tier.shard_path(manifest.job, manifest.step, entry))
        try:
            yield ShardData(view, "disk", path)
        finally:
            view.release()

    def usage(self) -> dict[str, int]:
        u = shutil.disk_usage(self.root if self.root.exists() else self.given)
        return {"total_bytes": u.total, "used_bytes": u.used, "free_bytes": u.free}

    def close(self) -> None:
        pass


if TYPE_CHECKING:
    AnySource: TypeAlias = DaemonSource | DiskSource | ObjectSource


def open_source(addr: str | None, root: str | None, timeout_s: float | None,
                bucket: BucketTarget | None = None) -> AnySource:
    if bucket is not None:
        from ckptd.ctl.bucket import ObjectSource

        return ObjectSource(bucket, timeout_s)
    if root is not None:
        return DiskSource(Path(root))
    return DaemonSource(addr, timeout_s)
