"""``ckptctl export``: a step's model as the files inference tools load, consolidated across ranks.

Output in ``--to DIR`` (the Hugging Face layout):
- ``--format safetensors``: ``model.safetensors``, or above ``--max-shard-size`` the files
  ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``
  (``{"metadata": {"total_size": N}, "weight_map": {name: file}}``); tensor names are the
  model's ``state_dict`` names (consolidate.py), dtypes kept.
- ``--format torch``: ``pytorch_model.bin``, a ``torch.save`` of ``{name: tensor}``: the tensors
  are streamed into a staging file and a torch-side child process writes the file from a mapping
  of it (``ckptd/ctl/torch_out.py``; this package never imports torch). A model above
  ``--memory-limit`` is still refused for this format, as it was when the file was built in memory.
- ``config.json`` when the step holds the model's config (the Hugging Face callback saves it as
  ``model_config``), so the directory loads with ``from_pretrained``.
- ``ckptd_state.json`` (``ckptd.export-state/v1``), written last: every rank's non-model state
  (optimizer ``param_groups``, scheduler, trainer state, plain values) as JSON, with each tensor
  there described by name, dtype and shape (not exported).

Streaming: tensor bytes go from the source to the file in pieces of whole checksum chunks, each
chunk's crc32c verified before its bytes are written, never more than ``--memory-limit`` bytes
held at once (``--root`` reads the shard files by range; a daemon serves each shard from its
memory slot, mapped read-only; ``--bucket`` reads each shard whole and so needs a limit of at
least a shard). Each file is written under a temporary name, fsynced and renamed; on an error
the files this run wrote are removed. Existing outputs need ``--force``.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ckptd.core.errors import AlreadyExists, IntegrityError, InvalidArgument, NotFound
from ckptd.core.manifest import Manifest, ShardEntry
from ckptd.core.types import DTYPE_ITEMSIZE
from ckptd.ctl.consolidate import (
    ChunkReader,
    FileChunks,
    Piece,
    full_tensor,
    model_tensors,
    pick_model_key,
    read_size,
    top_level,
)
from ckptd.ctl.consolidate_dcp import DcpTensor, dcp_state, dcp_tensors, is_dcp, record
from ckptd.ctl.model import Identity
from ckptd.ctl.output import Progress, emit_json, human_bytes
from ckptd.ctl.restore import SAFETENSORS_DTYPES
from ckptd.ctl.source import DiskSource
from ckptd.ctl.torch_out import TorchStage

if TYPE_CHECKING:
    from ckptd.ctl.source import AnySource

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
DEFAULT_MEMORY_LIMIT_BYTES = 256 * 2**20
STATE_NAME = "ckptd_state.json"
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Readers:
    """One ChunkReader per rank, opened on first use and closed with the export."""

    source: AnySource
    manifest: Manifest
    limit_bytes: int
    stack: ExitStack
    by_rank: dict[int, ChunkReader] = field(default_factory=dict)
    served_from: dict[int, str] = field(default_factory=dict)

    def get(self, rank: int) -> ChunkReader:
        if rank in self.by_rank:
            return self.by_rank[rank]
        entry = self.manifest.shard(rank)
        if isinstance(self.source, DiskSource):
            path = self.source.tier.shard_path(self.manifest.job, self.manifest.step, entry)
            if not path.is_file():
                raise NotFound(f"{path} is missing")
            if path.stat().st_size != entry.nbytes:
                raise IntegrityError(f"{path}: size {path.stat().st_size} != {entry.nbytes} in the manifest")
            chunks = FileChunks(path, read_size(entry, self.limit_bytes))
            reader = ChunkReader(entry, chunks, str(path), self.limit_bytes)
            self.served_from[rank] = "disk"
        else:
            if self.source.kind != "daemon" and entry.nbytes > self.limit_bytes:
                raise InvalidArgument(f"rank {rank}'s shard ({human_bytes(entry.nbytes)}) is read whole from the "
                                      f"object store: raise --memory-limit, or export with --root or a daemon")
            shard = self.stack.enter_context(self.source.open_shard(self.manifest, entry))
            buf = shard.buf
            reader = ChunkReader(entry, lambda a, n: buf[a : a + n], shard.location,
                                 max(self.limit_bytes, entry.chunk_bytes))
            self.served_from[rank] = shard.served_from
        self.by_rank[rank] = reader
        return reader


Full = Piece | DcpTensor  # a replicated tensor (one rank's copy) or one merged from DCP chunks


def _blocks(p: Full, readers: Readers) -> Iterator[memoryview]:
    """The full tensor's bytes in row-major order, verified."""
    if isinstance(p, DcpTensor):
        return p.blocks(readers.get)
    return readers.get(p.rank).pieces(p.entry.offset, p.entry.nbytes)


def plan_files(names: list[str], pieces: dict[str, Full], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most max_shard_bytes each (a larger tensor gets its own)."""
    files: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = pieces[name].entry.nbytes
        if files[-1] and size + n > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += n
    return files


def _write_safetensors(f: IO[bytes], names: list[str], pieces: dict[str, Full], readers: Readers,
                       meta: dict[str, str], bar: Progress) -> None:
    order = sorted(names, key=lambda n: (-DTYPE_ITEMSIZE[pieces[n].entry.dtype], n))
    header: dict[str, Any] = {"__metadata__": meta}
    pos = 0
    for name in order:
        t = pieces[name].entry
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in order:
        for data in _blocks(pieces[name], readers):
            f.write(data)
            bar.advance(len(data))


def _write_torch(f: IO[bytes], names: list[str], pieces: dict[str, Full], readers: Readers, bar: Progress) -> None:
    with TorchStage(Path(f.name)) as stage:
        for name in names:
            t = pieces[name].entry
            stage.add(name, t.dtype, t.shape, t.nbytes, _blocks(pieces[name], readers), bar.advance)
        bar.set_detail(f"{bar.detail} (torch.save)")
        stage.write_to(f)


def _plain(node: Any, tensors: tuple[Any, ...]) -> Any:
    """A tree node as JSON (tensors described, not exported)."""
    ((kind, val),) = node.items()
    if kind in ("t", "a"):
        t = tensors[val]
        return {"tensor": {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}}
    if kind == "v":
        return val
    if kind == "f":
        x = float.fromhex(val)
        return x if x - x == 0 else {"float": val}  # NaN and inf as their hex text
    if kind == "d":
        return {str(k): _plain(child, tensors) for k, child in val}
    if kind in ("l", "u"):
        return [_plain(child, tensors) for child in val]
    return _plain(val, tensors)  # "s": an object's state dict


def state_json(manifest: Manifest, model_key: str) -> bytes:
    if is_dcp(manifest):
        doc = {"schema": "ckptd.export-state/v1", "job": manifest.job, "step": manifest.step,
               "world_size": manifest.world_size, "model_key": model_key,
               "dcp": dcp_state(record(manifest), model_key)}
        return json.dumps(doc, indent=1, sort_keys=False).encode() + b"\n"
    ranks = []
    for shard in sorted(manifest.shards, key=lambda s: s.rank):
        rest = {str(k): _plain(node, shard.tensors) for k, node in top_level(shard.tree) if k != model_key}
        ranks.append({"rank": shard.rank, "state": rest})
    doc = {"schema": "ckptd.export-state/v1", "job": manifest.job, "step": manifest.step,
           "world_size": manifest.world_size, "model_key": model_key, "ranks": ranks}
    return json.dumps(doc, indent=1, sort_keys=False).encode() + b"\n"


def _model_config(shard: ShardEntry) -> bytes | None:
    node = dict(top_level(shard.tree)).get("model_config")
    if node is None or "v" not in node or not isinstance(node["v"], str):
        return None
    return node["v"].encode()


def _write(target: Path, written: list[Path], fill: Any) -> None:
    tmp = target.with_name(f".{target.name}.partial")
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    written.append(target)


def run_export(source: AnySource, ident: Identity, to: Path, fmt: str, model_key: str | None,
               max_shard_bytes: int, memory_limit_bytes: int, force: bool, as_json: bool,
               progress_enabled: bool) -> int:
    t0 = time.monotonic()
    manifest, _ = source.manifest(ident)
    pieces: dict[str, Full]
    if is_dcp(manifest):
        key, merged = dcp_tensors(manifest, model_key)
        pieces = dict(merged)
        for name, t in merged.items():
            if t.assemble_bytes() > memory_limit_bytes:
                raise InvalidArgument(f"{name!r} is sharded across more than its first dimension and is assembled "
                                      f"in memory ({human_bytes(t.assemble_bytes())}), above --memory-limit "
                                      f"{human_bytes(memory_limit_bytes)}")
    else:
        key = pick_model_key(manifest, model_key)
        pieces = {name: full_tensor(name, ps) for name, ps in model_tensors(manifest, key).items()}
    names = list(pieces)
    total = sum(p.entry.nbytes for p in pieces.values())
    if fmt == "safetensors":
        for name, p in pieces.items():
            if p.entry.dtype not in SAFETENSORS_DTYPES or name == "__metadata__":
                raise InvalidArgument(f"{name!r} ({p.entry.dtype}) cannot be stored in safetensors; use --format torch")
        groups = plan_files(names, pieces, max_shard_bytes)
        files = ["model.safetensors"] if len(groups) == 1 else \
            [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    else:
        if total > memory_limit_bytes:
            raise InvalidArgument(f"--format torch holds the whole model ({human_bytes(total)}) in memory, above "
                                  f"--memory-limit {human_bytes(memory_limit_bytes)}; use --format safetensors")
        groups, files = [names], ["pytorch_model.bin"]
    config = _model_config(manifest.shard(min(manifest.ranks)))
    outputs = files + ([INDEX_NAME] if len(files) > 1 else []) + (["config.json"] if config else []) + [STATE_NAME]
    to.mkdir(parents=True, exist_ok=True)
    existing = [str(to / n) for n in outputs if (to / n).exists()]
    if existing and not force:
        raise AlreadyExists(f"{existing[0]} already exists (use --force to overwrite)")
    written: list[Path] = []
    meta = {"format": "pt", "ckptd.job": manifest.job, "ckptd.step": str(manifest.step)}
    try:
        with ExitStack() as stack, Progress(f"export {manifest.job}@{manifest.step}", total, progress_enabled) as bar:
            readers = Readers(source, manifest, memory_limit_bytes, stack)
            for name, group in zip(files, groups):
                bar.set_detail(name)
                if fmt == "safetensors":
                    _write(to / name, written, lambda f, g=group: _write_safetensors(f, g, pieces, readers, meta, bar))
                else:
                    _write(to / name, written, lambda f, g=group: _write_torch(f, g, pieces, readers, bar))
            if len(files) > 1:
                index = {"metadata": {"total_size": total},
                         "weight_map": {n: f for f, g in zip(files, groups) for n in g}}
                _write(to / INDEX_NAME, written, lambda f: f.write(json.dumps(index, indent=2).encode() + b"\n"))
            if config:
                _write(to / "config.json", written, lambda f: f.write(config))
            _write(to / STATE_NAME, written, lambda f: f.write(state_json(manifest, key)))
            peak = max((r.peak_bytes for r in readers.by_rank.values()), default=0)
            served = dict(readers.served_from)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    seconds = time.monotonic() - t0
    if as_json:
        emit_json({"schema": "ckptctl.export/v1", "source": source.describe(), "job": manifest.job,
                   "step": manifest.step, "world_size": manifest.world_size, "format": fmt, "dir": str(to),
                   "model_key": key, "tensors": len(names), "nbytes": total, "files": [str(p) for p in written],
                   "served_from": {str(r): s for r, s in served.items()}, "peak_buffer_bytes": peak,
                   "memory_limit_bytes": memory_limit_bytes, "seconds": round(seconds, 6)})
        return 0
    print(f"exported {manifest.job}@{manifest.step} ({key}): {len(names)} tensors, {human_bytes(total)} "
          f"in {len(files)} file(s), {seconds:.2f}s -> {to}")
    return 0
