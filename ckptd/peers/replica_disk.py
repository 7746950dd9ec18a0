"""Replicas held for other nodes, kept on this node's disk as well (``peers.store_on_disk``).

A replica in a slot survives a restart of this daemon (its sidecar is re-adopted) but not a
reboot or a wiped shm dir; on disk it survives both. Layout, beside the disk tier's own steps:
``{data_root}/.replicas/{job}/step-{step:012d}/rank-{rank:06d}.shard`` and
``rank-{rank:06d}.replica.json`` (the replica's header: job, step, world size, source node, its
node's ranks, the shard entry with its crc32c list).

Invariants: written with the disk tier's protocol (temp file, fsync, link that never replaces,
directory fsync), the shard first and its header last, so a header is the commit of its replica;
at start-up temp dirs, shards without a header and headers whose shard is missing or of another
size are removed; reads verify every crc32c chunk; per (job, rank) only the newest ``keep``
steps stay.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ckptd.core.errors import AlreadyExists
from ckptd.core.manifest import ReplicaHeader
from ckptd.core.types import parse_step_dirname
from ckptd.memory.catalog import entry_from_sidecar
from ckptd.tiers.disk import DiskTier, read_verified

log = logging.getLogger("ckptd.replicas")
HEADER_SUFFIX = ".replica.json"


def header_to_json(h: ReplicaHeader) -> bytes:
    return json.dumps({
        "job": h.job, "step": h.step, "world_size": h.world_size, "replica_of": h.source_node,
        "node_ranks": list(h.node_ranks), "created_unix_s": h.created_unix_s, "extra": dict(h.extra),
        "shard": h.entry.to_json(),
    }, sort_keys=True, separators=(",", ":")).encode()


def header_from_json(data: bytes) -> ReplicaHeader:
    """Parse a header written by ``header_to_json`` (ValueError/KeyError/TypeError if malformed)."""
    obj: Any = json.loads(data)
    if not isinstance(obj, dict) or not isinstance(obj.get("extra") or {}, dict):
        raise ValueError("a replica header is a JSON object")
    job, step, world_size, created, entry = entry_from_sidecar(obj)
    h = ReplicaHeader(job, step, world_size, entry, str(obj["replica_of"]),
                      tuple(int(r) for r in obj.get("node_ranks") or ()), created, dict(obj.get("extra") or {}))
    h.validate()
    return h


class DiskReplicas:
    """Blocking store of replicas on local disk; run its methods in a worker thread."""

    def __init__(self, data_root: Path, direct_io: bool, block_bytes: int, keep: int = 2) -> None:
        self.tier = DiskTier(data_root / ".replicas", direct_io, block_bytes)
        self.keep = keep

    def _names(self, h: ReplicaHeader) -> tuple[str, str]:
        base = Path(h.entry.key).stem
        return h.entry.key, base + HEADER_SUFFIX

    def shard_path(self, h: ReplicaHeader) -> Path:
        return self.tier.step_dir(h.job, h.step) / h.entry.key

    def put(self, h: ReplicaHeader, view: memoryview) -> bool:
        """Store a verified replica durably; False if this replica was already stored."""
        shard_name, header_name = self._names(h)
        if (self.tier.step_dir(h.job, h.step) / header_name).exists():
            return False
        self.tier.put_file(h.job, h.step, shard_name, view[: h.nbytes], direct_io=True)
        try:
            self.tier.put_file(h.job, h.step, header_name, memoryview(header_to_json(h)), direct_io=False)
        except AlreadyExists:
            return False
        return True

    def read_into(self, h: ReplicaHeader, dst: memoryview) -> None:
        read_verified(self.shard_path(h), h.entry, dst, self.tier.block_bytes)

    def delete(self, h: ReplicaHeader) -> None:
        step_dir = self.tier.step_dir(h.job, h.step)
        shard_name, header_name = self._names(h)
        for name in (header_name, shard_name):  # the header first: it is the commit
            (step_dir / name).unlink(missing_ok=True)
        try:
            step_dir.rmdir()
        except OSError:
            pass  # other ranks' replicas of the step remain

    def retain(self, held: list[ReplicaHeader], h: ReplicaHeader) -> list[ReplicaHeader]:
        """Delete the older replicas of h's (job, rank) beyond ``keep``; return those deleted."""
        same = sorted((o for o in held if (o.job, o.entry.rank) == (h.job, h.entry.rank)), key=lambda o: o.step)
        doomed = same[: max(0, len(same) - self.keep)]
        for o in doomed:
            self.delete(o)
        return doomed

    def scan(self) -> list[ReplicaHeader]:
        """The committed replicas on disk, after removing every incomplete or broken one."""
        root = self.tier.root
        if not root.is_dir():
            return []
        found: list[ReplicaHeader] = []
        for job_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for step_dir in sorted(job_dir.iterdir()):
                if step_dir.name.startswith(".tmp-") or parse_step_dirname(step_dir.name) is None:
                    shutil.rmtree(step_dir, ignore_errors=True)
                    continue
                found += self._scan_step(step_dir)
                try:
                    step_dir.rmdir()  # only if it ended up empty
                except OSError:
                    pass
        return found

    def _scan_step(self, step_dir: Path) -> list[ReplicaHeader]:
        out: list[ReplicaHeader] = []
        headers = {p.name[: -len(HEADER_SUFFIX)]: p for p in step_dir.glob("*" + HEADER_SUFFIX)}
        for p in list(step_dir.iterdir()):
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.suffix == ".shard" and p.stem not in headers:
                p.unlink(missing_ok=True)  # data never committed by its header
        for stem, hp in headers.items():
            try:
                h = header_from_json(hp.read_bytes())
                shard = step_dir / h.entry.key
                if Path(h.entry.key).stem != stem or str(parse_step_dirname(step_dir.name)) != str(h.step) \
                        or step_dir.parent.name != h.job:
                    raise ValueError("header does not match its place")
                if shard.stat().st_size != h.nbytes:
                    raise ValueError(f"{shard.name} has {shard.stat().st_size} bytes, {h.nbytes} recorded")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("removing replica %s on disk: %s", hp, exc)
                hp.unlink(missing_ok=True)
                (step_dir / f"{stem}.shard").unlink(missing_ok=True)
                continue
            out.append(h)
        return out
