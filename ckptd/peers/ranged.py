"""Ranged FetchShard: only the integrity chunks covering a restore's byte ranges cross the wire.

A fetcher names byte ranges of the shard (FetchShardRequest.ranges); the serving peer answers
with the header (``chunks_only`` set) and then each integrity chunk (the header's chunk_bytes)
covering them, in ascending order, as contiguous transfer chunks. Both ends derive the chunk list
from the ranges and the header alike (``ranged_chunks``). Invariants on the fetcher's side
(``read_ranged``): every transfer chunk matches its own crc32c and every integrity chunk the
shard's checksum list before anything after it is taken; bytes outside the chunks asked for, a
chunk out of order, or a chunk missing at the end of the stream fail the fetch. A damaged chunk
the ranges do not cover is never sent, so it cannot fail the fetch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from ckptd.core.errors import IntegrityError, InvalidArgument
from ckptd.core.integrity import StreamVerifier, covering_chunks
from ckptd.core.manifest import ReplicaHeader
from ckptd.peers.wire import RawChunk

_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # end-of-stream marker


def ranged_chunks(ranges: Sequence[tuple[int, int]], chunk_bytes: int, nbytes: int) -> list[int]:
    """The integrity chunks a ranged FetchShard sends: those covering ``ranges``, ascending
    (InvalidArgument for a range outside the shard)."""
    try:
        return covering_chunks(ranges, chunk_bytes, nbytes)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


async def read_ranged(call: Any, header: ReplicaHeader, ranges: Sequence[tuple[int, int]],
                      put: Callable[[RawChunk], Awaitable[None]]) -> None:
    """Read a ranged stream's chunks from ``call`` (after its header), verify each and hand it to
    ``put`` (which stores it). InvalidArgument for a malformed stream, IntegrityError for a chunk
    that does not match the shard's checksum list (named by its index)."""
    e = header.entry
    pending = ranged_chunks(ranges, e.chunk_bytes, e.nbytes)[::-1]  # popped in ascending order
    verifier: StreamVerifier | None = None
    index = 0
    while (msg := await call.read()) is not _EOF:
        if not isinstance(msg, RawChunk):
            raise InvalidArgument("a second header inside the stream")
        if verifier is None:
            if not pending:
                raise InvalidArgument(f"bytes at offset {msg.offset} beyond the chunks asked for")
            index = pending.pop()
            size = min(e.chunk_bytes, e.nbytes - index * e.chunk_bytes)
            verifier = StreamVerifier(size, e.chunk_bytes, [e.chunk_crc32c[index]])
        try:  # offsets relative to chunk index: in order inside it, or refused
            verifier.feed(msg.offset - index * e.chunk_bytes, msg.data, msg.crc32c)
        except IntegrityError:
            raise IntegrityError(f"crc32c mismatch in chunk {index} (the peer's copy is corrupt)") from None
        await put(msg)
        if verifier.received == verifier.nbytes:
            verifier.finish()
            verifier = None
    if verifier is not None or pending:
        raise InvalidArgument("the stream ended before every chunk asked for")
