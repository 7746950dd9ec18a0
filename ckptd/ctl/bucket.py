"""``ckptctl --bucket``: read (and, for ``gc``/``rm``, clean) an object store with no daemon.

``--bucket B [--endpoint URL] [--preset aws|minio|oss] [--prefix P] [--region R]`` names the
store the way the daemon's ``[object]`` section does (the preset defaults to ``minio`` when an
endpoint is given, else ``aws``). Credentials come from the standard AWS chain (environment,
``AWS_PROFILE``, config files), never from the command line. ``ObjectSource`` answers the same
questions as the daemon and disk-root sources through ``ckptd.tiers.object.ObjectTier`` (boto3 is
imported only here, only when ``--bucket`` is used, so ``import ckptd_client`` stays light).
A step exists in the store only with its manifest: steps are listed from manifests, and every
shard read is checked against the manifest's crc32c chunk sums; errors name ``s3://bucket/key``.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptd.core.errors import CkptdError, IntegrityError, NotFound
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.ctl.model import Identity, Planned, ShardData, StepRow

if TYPE_CHECKING:
    from ckptd.tiers.object import ObjectTier

CONNECT_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 3
TOTAL_TIMEOUT_S = 600.0
LIST_THREADS = 8
SUGGEST_MAX_PREFIXES = 50  # sub-prefixes looked at per level when suggesting where checkpoints are
SUGGEST_MAX_JOB_PROBES = 3  # job-like sub-prefixes probed for step directories per candidate


@dataclass(frozen=True)
class BucketTarget:
    """``--bucket B [--endpoint URL] [--preset P] [--prefix P] [--region R]``."""

    bucket: str
    endpoint: str | None = None
    preset: str | None = None
    prefix: str | None = None
    region: str | None = None


def object_tier(target: BucketTarget, timeout_s: float | None = None) -> ObjectTier:
    """An ObjectTier on the target (InvalidArgument, exit 2, for a bad bucket, prefix or endpoint)."""
    from ckptd.core.config.object import ObjectSection, validate_object

    try:
        from ckptd.tiers.object import ObjectTier
    except ImportError as exc:
        raise CkptdError(f"--bucket needs boto3 (pip install 'ckptd[s3]'): {exc}") from None
    section = ObjectSection(
        enabled=True, bucket=target.bucket, preset=target.preset or ("minio" if target.endpoint else "aws"),
        endpoint_url=target.endpoint or "", region=target.region or "", prefix=target.prefix or "",
        connect_timeout_s=CONNECT_TIMEOUT_S, max_attempts=MAX_ATTEMPTS,
        total_timeout_s=min(timeout_s or TOTAL_TIMEOUT_S, 86400.0))
    validate_object(section)
    return ObjectTier(section)


class ObjectSource:
    """An S3-compatible bucket, read directly (no daemon needed)."""

    kind = "object"

    def __init__(self, target: BucketTarget, timeout_s: float | None = None) -> None:
        self.target = target
        self.tier = object_tier(target, timeout_s)
        self.where = f"s3://{self.tier.bucket}/{self.tier.base}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "object", "bucket": self.tier.bucket, "prefix": self.tier.base.rstrip("/"),
                "endpoint": self.tier.endpoint_url}

    def list_jobs(self) -> list[str]:
        return self.tier.list_jobs()

    # -- where the checkpoints are, when the listed prefix holds none ----------------------------
    def _children(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` sub-prefixes ("a/b/") right below ``prefix`` (one LIST request)."""
        resp = self.tier.client.list_objects_v2(Bucket=self.tier.bucket, Prefix=prefix, Delimiter="/",
                                                MaxKeys=limit)
        return [str(cp["Prefix"]) for cp in resp.get("CommonPrefixes", ())]

    def _holds_jobs(self, prefix: str) -> bool:
        """Whether ``prefix`` looks like an object tier's prefix: a sub-prefix named like a job
        holding a ``step-NNNNNNNNNNNN/`` directory (a few LIST requests at most)."""
        from ckptd.core.types import parse_step_dirname, validate_job

        probed = 0
        for child in self._children(prefix, SUGGEST_MAX_PREFIXES):
            try:
                validate_job(child[len(prefix):].rstrip("/"))
            except ValueError:
                continue
            if any(parse_step_dirname(c[len(child):].rstrip("/")) is not None for c in self._children(child, 10)):
                return True
            probed += 1
            if probed >= SUGGEST_MAX_JOB_PROBES:
                break
        return False

    def prefixes_with_checkpoints(self) -> list[str]:
        """Prefixes of the bucket that hold checkpoints ("" for the bucket's top level), among the
        bucket's top-level prefixes and those right below the listed prefix; [] when the store
        cannot be listed. Bounded: a handful of LIST requests per candidate."""
        from ckptd.tiers.object_client import STORE_ERRORS

        base = self.tier.base
        found: list[str] = []
        try:
            if base and self._holds_jobs(""):
                found.append("")
            for parent in ("", base) if base else ("",):
                for p in self._children(parent, SUGGEST_MAX_PREFIXES):
                    if p != base and p.rstrip("/") not in found and self._holds_jobs(p):
                        found.append(p.rstrip("/"))
        except STORE_ERRORS:
            return found
        return found

    def empty_hint(self) -> list[str]:
        """What ``ls`` says when the listed prefix holds no checkpoint: where it looked and where
        checkpoints are."""
        shown = f"prefix {self.tier.base.rstrip('/')!r}" if self.tier.base else "no --prefix"
        lines = [f"listed {self.where} ({shown})"]
        found = self.prefixes_with_checkpoints()
        if found:
            lines.append("checkpoints found in this bucket under: " + ", ".join(
                f"--prefix {p}" if p else "the bucket's top level (no --prefix)" for p in found))
        return lines

    def committed(self, job: str) -> list[int]:
        """Committed steps of job, oldest first; NotFound when the store has no such job."""
        steps = self.tier.list_committed(job)
        if not steps and job not in self.tier.list_jobs():
            raise NotFound(f"unknown job {job!r} in {self.where}")
        return steps

    def _row(self, job: str, step: int) -> StepRow | None:
        try:
            m = self.tier.read_manifest(job, step)
        except IntegrityError:
            return StepRow(job, step, 0, 0, False, {"object": "invalid"})
        except NotFound:  # removed since it was listed
            return None
        return StepRow(job, step, m.world_size, m.nbytes, True, {"object": "committed"})

    def list_steps(self, job: str) -> list[StepRow]:
        steps = self.committed(job)
        with ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="ckptctl-ls") as pool:
            rows = list(pool.map(lambda s: self._row(job, s), steps))
        return [r for r in rows if r is not None]

    def manifest(self, ident: Identity) -> tuple[Manifest, list[str]]:
        step = ident.step
        if step is None:
            steps = self.committed(ident.job)
            if not steps:
                raise NotFound(f"no committed step of job {ident.job!r} in {self.where}")
            step = steps[-1]
        return self.tier.read_manifest(ident.job, step), ["object"]

    def shard_url(self, manifest: Manifest, entry: ShardEntry) -> str:
        """The shard object, or for a chunked shard the pattern of its chunk objects in its step."""
        if entry.chunks:
            first = self.tier.chunk_object_key(manifest.job, manifest.step, entry.rank, 0)
            return self.tier.url(first.removesuffix(".c000000")) + ".c*"
        return self.tier.url(self.tier._entry_key(manifest.job, manifest.step, entry))

    def manifest_url(self, manifest: Manifest) -> str:
        return self.tier.url(self.tier.manifest_key(manifest.job, manifest.step))

    def plan(self, manifest: Manifest, rank: int) -> list[Planned]:
        return [Planned("object", self.shard_url(manifest, manifest.shard(rank)))]

    def head_size(self, manifest: Manifest, entry: ShardEntry) -> int | None:
        """The shard's size, None when its object (or one of its chunk objects) is missing
        (TierFailed when the store fails). A chunked shard's size is its logical size when every
        chunk object has its recorded size, and is off by the difference otherwise."""
        if entry.chunks:
            want = {self.tier.check_chunk_key(manifest.job, c.object_key): c.stored_bytes for c in entry.chunks}
            sizes = [self._head_size(k) for k in sorted(want)]
            if any(n is None for n in sizes):
                return None
            return entry.nbytes + sum(n or 0 for n in sizes) - sum(want.values())
        return self._head_size(self.tier._entry_key(manifest.job, manifest.step, entry))

    def _head_size(self, key: str) -> int | None:
        try:
            head = self.tier._head(key)
        except Exception as exc:  # noqa: BLE001 - botocore's errors, typed here
            raise self.tier._failed(f"reading {self.tier.url(key)}", exc) from exc
        return None if head is None else int(head["ContentLength"])

    @contextmanager
    def open_shard(self, manifest: Manifest, entry: ShardEntry) -> Iterator[ShardData]:
        """Read the shard object into a buffer (size and every crc32c chunk checked)."""
        buf = bytearray(entry.nbytes)
        view = memoryview(buf)
        self.tier.read_shard_into(manifest.job, manifest.step, entry, view)
        try:
            yield ShardData(view, "object", self.shard_url(manifest, entry))
        finally:
            view.release()

    def close(self) -> None:
        self.tier.close()
