"""``ckptctl restore``: export a step into a directory that loads without ckptd installed.

Output: one ``rank-NNNNNN.safetensors`` per rank (tensor names are the manifest's names, dtypes
kept, bfloat16 and float8 included) or, with ``--format torch``, one ``rank-NNNNNN.pt`` holding a
``{name: tensor}`` dict written by ``torch.save`` (staged, then converted by a torch-side child
process: ``ckptd/ctl/torch_out.py``; this package never imports torch); plus ``manifest.json`` (the
step's manifest, with the typed tree of non-tensor values), written last, so a directory without
it is incomplete.
Each file is written under a temporary name and renamed into place. The safetensors writer is
built in (format: 8-byte little-endian header length, JSON header, packed data; tensors ordered
by item size then name so each is aligned), so it needs neither torch nor numpy bfloat16 support.
``--dry-run`` prints the per-shard source plan and reads nothing.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ckptd.core.errors import AlreadyExists, InvalidArgument
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import DTYPE_ITEMSIZE
from ckptd.ctl.model import Identity
from ckptd.ctl.output import Progress, emit_json, human_bytes, render_fields, render_table
from ckptd.ctl.torch_out import TorchStage

if TYPE_CHECKING:
    from ckptd.ctl.source import AnySource

#: ckptd dtype name -> safetensors dtype tag. complex128 has no safetensors tag.
SAFETENSORS_DTYPES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "complex64": "C64",
}
WRITE_PIECE_BYTES = 16 * 2**20
FORMATS = {"safetensors": ".safetensors", "torch": ".pt"}


def rank_filename(rank: int, fmt: str) -> str:
    return f"rank-{rank:06d}{FORMATS[fmt]}"


def check_safetensors_compatible(entry: ShardEntry) -> None:
    for t in entry.tensors:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise InvalidArgument(f"rank {entry.rank}: tensor {t.name!r} has dtype {t.dtype}, which "
                                  "safetensors cannot store; use --format torch")
        if t.name == "__metadata__":
            raise InvalidArgument(f"rank {entry.rank}: a tensor named '__metadata__' cannot be stored in "
                                  "safetensors; use --format torch")


def _pieces(buf: memoryview, start: int, nbytes: int) -> Iterator[memoryview]:
    end = start + nbytes
    for pos in range(start, end, WRITE_PIECE_BYTES):
        yield buf[pos : min(end, pos + WRITE_PIECE_BYTES)]


def _write_range(f: IO[bytes], buf: memoryview, start: int, nbytes: int, advance: Callable[[int], None]) -> None:
    for piece in _pieces(buf, start, nbytes):
        f.write(piece)
        advance(len(piece))


def write_safetensors(f: IO[bytes], buf: memoryview, tensors: tuple[TensorEntry, ...], metadata: dict[str, str],
                      advance: Callable[[int], None]) -> int:
    """Write a safetensors file from a shard buffer; return the bytes of tensor data written."""
    order = sorted(tensors, key=lambda t: (-DTYPE_ITEMSIZE[t.dtype], t.name))
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for t in order:
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in order:
        _write_range(f, buf, t.offset, t.nbytes, advance)
    return pos


def write_torch(f: IO[bytes], buf: memoryview, tensors: tuple[TensorEntry, ...],
                advance: Callable[[int], None]) -> int:
    """torch.save a ``{name: tensor}`` dict into f, through a staging file and the torch-side child."""
    with TorchStage(Path(f.name)) as stage:
        total = 0
        for t in tensors:
            total += stage.add(t.name, t.dtype, t.shape, t.nbytes, _pieces(buf, t.offset, t.nbytes), advance)
        stage.write_to(f)
    return total


def _export(f: IO[bytes], fmt: str, buf: memoryview, manifest: Manifest, entry: ShardEntry,
            advance: Callable[[int], None]) -> int:
    if fmt == "torch":
        return write_torch(f, buf, entry.tensors, advance)
    meta = {"format": "pt", "ckptd.job": manifest.job, "ckptd.step": str(manifest.step),
            "ckptd.rank": str(entry.rank), "ckptd.world_size": str(manifest.world_size)}
    return write_safetensors(f, buf, entry.tensors, meta, advance)


@dataclass
class RestoredFile:
    rank: int
    path: str
    file_bytes: int
    shard_bytes: int
    tensors: int
    served_from: str
    source: str
    seconds: float
    rejected: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "path": self.path, "file_bytes": self.file_bytes,
                "shard_bytes": self.shard_bytes, "tensors": self.tensors,
                "served_from": self.served_from, "source": self.source, "seconds": round(self.seconds, 6),
                "rejected": self.rejected}


def _write_file(target: Path, writer: Callable[[IO[bytes]], int]) -> int:
    tmp = target.with_name(f".{target.name}.partial")
    try:
        with open(tmp, "wb") as f:
            n = writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _same_bytes(path: Path, data: bytes) -> bool:
    """True for an existing manifest.json of the same step (restoring more ranks or another format)."""
    try:
        return path.name == "manifest.json" and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def select_ranks(manifest: Manifest, rank: int | None) -> list[ShardEntry]:
    if rank is None:
        return sorted(manifest.shards, key=lambda s: s.rank)
    if not 0 <= rank < manifest.world_size:
        raise InvalidArgument(f"--rank {rank} outside world_size {manifest.world_size} of "
                              f"{manifest.job}@{manifest.step}")
    return [manifest.shard(rank)]


def run_dry_run(source: AnySource, ident: Identity, rank: int | None, as_json: bool) -> int:
    manifest, tiers = source.manifest(ident)
    shards: list[dict[str, Any]] = []
    rows: list[list[object]] = []
    for entry in select_ranks(manifest, rank):
        plan = source.plan(manifest, entry.rank)
        shards.append({"rank": entry.rank, "nbytes": entry.nbytes,
                       "plan": [{"tier": p.tier, "detail": p.detail} for p in plan]})
        rows += [[entry.rank if i == 0 else "", i + 1, p.tier, p.detail] for i, p in enumerate(plan)]
    if as_json:
        emit_json({"schema": "ckptctl.restore-plan/v1", "source": source.describe(), "job": manifest.job,
                   "step": manifest.step, "world_size": manifest.world_size, "tiers": tiers, "shards": shards})
        return 0
    render_fields([("job", manifest.job), ("step", manifest.step), ("world size", manifest.world_size),
                   ("committed at", ", ".join(tiers) or "-")])
    print()
    render_table(["RANK", "TRY", "TIER", "SOURCE"], rows, right=(0, 1))
    return 0


def run_restore(source: AnySource, ident: Identity, to: Path, fmt: str, rank: int | None,
                force: bool, as_json: bool, progress_enabled: bool) -> int:
    t0 = time.monotonic()
    manifest, _ = source.manifest(ident)
    entries = select_ranks(manifest, rank)
    if fmt == "safetensors":
        for entry in entries:
            check_safetensors_compatible(entry)
    to.mkdir(parents=True, exist_ok=True)
    manifest_bytes = manifest.to_json() + b"\n"
    targets = [to / rank_filename(e.rank, fmt) for e in entries] + [to / "manifest.json"]
    existing = [str(p) for p in targets if p.exists() and not _same_bytes(p, manifest_bytes)]
    if existing and not force:
        raise AlreadyExists(f"{existing[0]} already exists (use --force to overwrite)")
    files: list[RestoredFile] = []
    total = sum(e.nbytes for e in entries)
    with Progress(f"restore {manifest.job}@{manifest.step}", total, progress_enabled) as bar:
        for entry in entries:
            t1 = time.monotonic()
            target = to / rank_filename(entry.rank, fmt)
            with source.open_shard(manifest, entry) as shard:
                written = _write_file(target, functools.partial(
                    _export, fmt=fmt, buf=shard.buf, manifest=manifest, entry=entry, advance=bar.advance))
                bar.advance(entry.nbytes - written)  # alignment gaps between tensors
                files.append(RestoredFile(entry.rank, str(target), target.stat().st_size, entry.nbytes,
                                          len(entry.tensors), shard.served_from, shard.location,
                                          time.monotonic() - t1, shard.rejected))
        manifest_path = to / "manifest.json"
        _write_file(manifest_path, lambda f: f.write(manifest_bytes))
    seconds = time.monotonic() - t0
    if as_json:
        emit_json({"schema": "ckptctl.restore/v1", "source": source.describe(), "job": manifest.job,
                   "step": manifest.step, "world_size": manifest.world_size, "format": fmt, "dir": str(to),
                   "manifest": str(manifest_path), "nbytes": total, "seconds": round(seconds, 6),
                   "files": [f.to_json() for f in files]})
        return 0
    render_table(["RANK", "FILE", "SIZE", "TENSORS", "FROM"],
                 [[f.rank, f.path, human_bytes(f.file_bytes), f.tensors, f.served_from] for f in files],
                 right=(0, 2, 3))
    print(f"restored {manifest.job}@{manifest.step}: {len(files)} of {manifest.world_size} ranks, "
          f"{human_bytes(total)} in {seconds:.2f}s -> {to}")
    return 0
