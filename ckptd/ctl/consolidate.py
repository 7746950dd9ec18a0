"""Consolidation for ``ckptctl export``: which saved bytes make each of the model's tensors, and
reading them piece by piece, checksums verified, within a memory limit.

The model's tensors are the leaves of one top-level key of the saved state (``"model"`` as the
Hugging Face callback saves it, ``"state_dict"`` as Lightning does; ``--model-key`` picks
another), named as in the model's ``state_dict``. ``model_tensors`` collects, for every name, the
copy each rank saved; ``full_tensor`` turns one name's copies into the one full tensor to export:
the one seam where sharded state is merged. A replicated (DDP) tensor is taken once, from the
lowest rank. DTensor / FSDP shards (each rank holding a slice with its placement) are recorded by
issue 16's storage format, which this manifest version does not have: a name whose copies differ
in shape or dtype raises ``InvalidArgument`` here, and that merge lands in ``full_tensor`` with
issue 16.

``ChunkReader`` reads byte ranges of one shard through whole integrity chunks (a source's
``chunk_bytes``), verifies every chunk's crc32c against the manifest before handing out any of
its bytes, and never holds more than ``limit_bytes`` at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptd.core.errors import IntegrityError, InvalidArgument
from ckptd.core.integrity import crc32c
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import Manifest, ShardEntry

MODEL_KEYS = ("model", "state_dict")


@dataclass(frozen=True)
class Piece:
    """One rank's saved copy of a tensor."""

    rank: int
    entry: TensorEntry


def top_level(tree: Any) -> list[tuple[Any, Any]]:
    node = tree.get("s", tree)
    return list(node.get("d", []))


def pick_model_key(manifest: Manifest, wanted: str | None) -> str:
    keys = [k for k, _ in top_level(manifest.shards[0].tree)]
    if wanted is not None:
        if wanted not in keys:
            raise InvalidArgument(f"{manifest.job}@{manifest.step} has no top-level key {wanted!r} "
                                  f"(it has {keys})")
        return wanted
    for k in MODEL_KEYS:
        if k in keys:
            return k
    raise InvalidArgument(f"{manifest.job}@{manifest.step}: no model found (none of {list(MODEL_KEYS)} among "
                          f"the top-level keys {keys}); name it with --model-key")


def _leaves(node: Any, prefix: str, out: list[tuple[str, int]]) -> None:
    ((kind, val),) = node.items()
    if kind in ("t", "a"):
        out.append((prefix, val))
    elif kind == "s":
        _leaves(val, prefix, out)
    elif kind == "d":
        for k, child in val:
            _leaves(child, f"{prefix}.{k}" if prefix else str(k), out)
    elif kind in ("l", "u"):
        for i, child in enumerate(val):
            _leaves(child, f"{prefix}.{i}" if prefix else str(i), out)


def model_tensors(manifest: Manifest, model_key: str) -> dict[str, list[Piece]]:
    """name -> every rank's copy, names in the order of the lowest rank's state dict."""
    out: dict[str, list[Piece]] = {}
    for shard in sorted(manifest.shards, key=lambda s: s.rank):
        subtree = dict(top_level(shard.tree)).get(model_key)
        if subtree is None:
            continue
        names: list[tuple[str, int]] = []
        _leaves(subtree, "", names)
        for name, index in names:
            out.setdefault(name, []).append(Piece(shard.rank, shard.tensors[index]))
    if not out:
        raise InvalidArgument(f"{manifest.job}@{manifest.step}: {model_key!r} holds no tensors")
    return out


def full_tensor(name: str, pieces: list[Piece]) -> Piece:
    """The saved bytes of tensor ``name`` as one full tensor (see module docstring: the seam where
    DTensor/FSDP shards will be merged)."""
    first = pieces[0]
    for p in pieces[1:]:
        if (p.entry.dtype, p.entry.shape) != (first.entry.dtype, first.entry.shape):
            raise InvalidArgument(
                f"{name!r}: rank {first.rank} saved {first.entry.dtype}{list(first.entry.shape)}, rank {p.rank} "
                f"{p.entry.dtype}{list(p.entry.shape)}: sharded tensors are consolidated once the checkpoint "
                "records their placements (DTensor/FSDP state, issue 16); export its replicated keys only")
    return first  # replicated (DDP): every rank holds the same tensor; rank order picks the lowest


def read_size(entry: ShardEntry, limit_bytes: int) -> int:
    """The most bytes one verified read of ``entry`` takes under ``limit_bytes``: whole chunks."""
    if limit_bytes < entry.chunk_bytes:
        raise InvalidArgument(f"--memory-limit {limit_bytes} is below the shard's checksum chunk of "
                              f"{entry.chunk_bytes} bytes (the unit that can be verified)")
    return (limit_bytes // entry.chunk_bytes) * entry.chunk_bytes


class ChunkReader:
    """Verified byte ranges of one shard (see module docstring)."""

    def __init__(self, entry: ShardEntry, read_chunks: Callable[[int, int], memoryview | bytes], where: str,
                 limit_bytes: int) -> None:
        self.entry = entry
        self.read_chunks = read_chunks  # (offset, nbytes) -> bytes, whole chunks
        self.where = where
        self.chunks_per_read = read_size(entry, limit_bytes) // entry.chunk_bytes
        self.peak_bytes = 0

    def pieces(self, offset: int, nbytes: int) -> Iterator[memoryview]:
        """The bytes [offset, offset + nbytes), in pieces, each from verified chunks."""
        cb = self.entry.chunk_bytes
        end = offset + nbytes
        first, last = offset // cb, -(-end // cb)
        for c0 in range(first, last, self.chunks_per_read):
            c1 = min(last, c0 + self.chunks_per_read)
            a, b = c0 * cb, min(c1 * cb, self.entry.nbytes)
            data = memoryview(self.read_chunks(a, b - a))
            if len(data) != b - a:
                raise IntegrityError(f"{self.where}: short read at {a} ({len(data)} of {b - a} bytes)")
            self.peak_bytes = max(self.peak_bytes, len(data))
            for c in range(c0, c1):
                lo = c * cb - a
                if crc32c(data[lo : min(lo + cb, len(data))]) != self.entry.chunk_crc32c[c]:
                    raise IntegrityError(f"{self.where}: crc32c mismatch in chunk {c} (offset {c * cb})")
            yield data[max(offset, a) - a : min(end, b) - a]


class FileChunks:
    """A shard file read by range into one reused buffer (the disk tier's layout: the shard's
    bytes, nothing else). What a read returns is valid until the next read."""

    def __init__(self, path: Path, buffer_bytes: int) -> None:
        self.path = path
        self.buffer_bytes = buffer_bytes
        self._buf: bytearray | None = None

    def __call__(self, offset: int, nbytes: int) -> memoryview:
        if nbytes > self.buffer_bytes:
            raise ValueError(f"read of {nbytes} bytes above the {self.buffer_bytes}-byte buffer")
        if self._buf is None:
            self._buf = bytearray(self.buffer_bytes)
        view = memoryview(self._buf)[:nbytes]
        got = 0
        with open(self.path, "rb", buffering=0) as f:
            while got < nbytes:
                n = os.preadv(f.fileno(), [view[got:]], offset + got)
                if not n:
                    break
                got += n
        return view[:got]
