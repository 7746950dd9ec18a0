"""Where the object tier keeps each object of a step in its bucket. Pure: no I/O.

Layout (DESIGN.md section 4) under ``{prefix}/``::

    {job}/step-{step:012d}/manifest.json                       the commit record, written last
    {job}/step-{step:012d}/manifest.claim                      a commit claim (stores without create-only puts)
    {job}/step-{step:012d}/rank-{rank:06d}.shard.meta.json     a rank's record for the coordinator
    {job}/step-{step:012d}/rank-{rank:06d}.shard.c{i:06d}      chunk objects (hashed_prefixes = 0)
    _shards/{h:04x}/{job}/step-{step:012d}/rank-{rank:06d}.shard.c{i:06d}   (hashed_prefixes = N > 0)
    {job}/step-{step:012d}/rank-{rank:06d}.shard               whole-shard objects of older steps
    _shards/{h:04x}/{job}/step-{step:012d}/rank-{rank:06d}.shard   (idem, hashed)
    _ckptd/probe-{uuid}                                        the create-only probe, removed after

Invariants:
- ``h = sha256("{job}/{step}/{rank}/{i}") mod N`` spreads a step's chunk writes over N key
  prefixes (S3 throttles per prefix) while manifests stay under one listable prefix; a step's
  objects are listed under N + 1 prefixes (``step_shard_prefixes``), a job's under N + 1 too.
- A chunk record may reference a chunk object of another step of the same job (deduplication);
  ``check_chunk_key`` accepts only keys this layout can produce for that job.
- The object tier's manifest records each shard's full key (``ShardEntry.object_key``); reads
  use the recorded key, so changing ``hashed_prefixes`` never strands committed steps. A
  recorded key is accepted only if this layout can produce it for that job, step and rank, so a
  hostile manifest cannot point reads or deletes elsewhere.
- ``_shards`` and ``_ckptd`` are not valid job names, so listing jobs never mistakes them for jobs.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Final

from ckptd.core.errors import IntegrityError
from ckptd.core.manifest import MANIFEST_NAME, ShardEntry
from ckptd.core.types import shard_key, step_dirname, validate_job, validate_step

CLAIM_NAME: Final = "manifest.claim"
SHARD_META_SUFFIX: Final = ".meta.json"
HASHED_DIR: Final = "_shards"
PROBE_DIR: Final = "_ckptd"


class ObjectLayout:
    """The keys of one tier: a bucket, a key prefix and a number of hashed shard prefixes."""

    def __init__(self, bucket: str, prefix: str, hashed_prefixes: int) -> None:
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.base = f"{prefix}/" if prefix else ""
        self.hashed_prefixes = hashed_prefixes

    def job_prefix(self, job: str) -> str:
        return f"{self.base}{validate_job(job)}/"

    def step_prefix(self, job: str, step: int) -> str:
        return f"{self.base}{validate_job(job)}/{step_dirname(validate_step(step))}/"

    def manifest_key(self, job: str, step: int) -> str:
        return self.step_prefix(job, step) + MANIFEST_NAME

    def claim_key(self, job: str, step: int) -> str:
        return self.step_prefix(job, step) + CLAIM_NAME

    def shard_meta_key(self, job: str, step: int, rank: int) -> str:
        return self.step_prefix(job, step) + shard_key(rank) + SHARD_META_SUFFIX

    def probe_key(self) -> str:
        return f"{self.base}{PROBE_DIR}/probe-{uuid.uuid4().hex}"

    def hashed_dir(self, index: int) -> str:
        return f"{self.base}{HASHED_DIR}/{index:04x}/"

    def shard_object_key(self, job: str, step: int, rank: int) -> str:
        """Where put_shard stores rank's shard under the current configuration."""
        n = self.hashed_prefixes
        if n <= 0:
            return self.step_prefix(job, step) + shard_key(rank)
        digest = hashlib.sha256(f"{job}/{step}/{rank}".encode()).digest()
        index = int.from_bytes(digest[:8], "big") % n
        return f"{self.hashed_dir(index)}{validate_job(job)}/{step_dirname(step)}/{shard_key(rank)}"

    def chunk_object_key(self, job: str, step: int, rank: int, index: int) -> str:
        """Where put_shard stores chunk ``index`` of rank's shard under the current configuration."""
        name = f"{shard_key(rank)}.c{index:06d}"
        n = self.hashed_prefixes
        if n <= 0:
            return self.step_prefix(job, step) + name
        digest = hashlib.sha256(f"{job}/{step}/{rank}/{index}".encode()).digest()
        h = int.from_bytes(digest[:8], "big") % n
        return f"{self.hashed_dir(h)}{validate_job(job)}/{step_dirname(step)}/{name}"

    def check_chunk_key(self, job: str, key: str) -> str:
        """key, if this layout can produce it for a chunk of any step of job; else IntegrityError
        (a hostile manifest cannot point reads or deletes outside the job)."""
        tail = re.escape(f"{validate_job(job)}/") + r"step-[0-9]{12}/rank-[0-9]{6}\.shard\.c[0-9]{6}"
        plain = re.escape(self.base) + tail
        hashed = re.escape(f"{self.base}{HASHED_DIR}/") + r"[0-9a-f]{4}/" + tail
        if not (re.fullmatch(plain, key) or re.fullmatch(hashed, key)):
            raise IntegrityError(f"s3://{self.bucket}: a manifest of {job} names chunk key {key!r} outside "
                                 "this tier's layout")
        return key

    def job_data_prefixes(self, job: str) -> list[str]:
        """Every prefix an object of job may live under in this configuration."""
        return [self.job_prefix(job)] + [self.hashed_dir(i) + f"{validate_job(job)}/"
                                         for i in range(self.hashed_prefixes)]

    @staticmethod
    def step_of_key(key: str) -> int | None:
        """The step a data or record key of the layout belongs to (None: not a step's key)."""
        m = re.search(r"/step-([0-9]{12})/", "/" + key)
        return int(m.group(1)) if m else None

    def _entry_key(self, job: str, step: int, entry: ShardEntry) -> str:
        """The object key of entry: the recorded one (checked to be one this layout can produce
        for job/step/rank, so a hostile manifest cannot point reads or deletes elsewhere), or
        the configured one when none is recorded."""
        if not entry.object_key:
            return self.shard_object_key(job, step, entry.rank)
        tail = f"{validate_job(job)}/{step_dirname(step)}/{shard_key(entry.rank)}"
        hashed = re.escape(f"{self.base}{HASHED_DIR}/") + r"[0-9a-f]{4}/" + re.escape(tail)
        if entry.object_key != self.base + tail and not re.fullmatch(hashed, entry.object_key):
            raise IntegrityError(
                f"s3://{self.bucket}: manifest of {job}@{step} names object key {entry.object_key!r} "
                "outside this tier's layout"
            )
        return entry.object_key

    def step_shard_prefixes(self, job: str, step: int) -> list[str]:
        """Every prefix a shard object of job@step may live under in this configuration."""
        tail = f"{job}/{step_dirname(step)}/"
        return [self.step_prefix(job, step)] + [self.hashed_dir(i) + tail for i in range(self.hashed_prefixes)]
