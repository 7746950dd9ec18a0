"""The peer wire: protobuf conversions, a zero-copy chunk codec, auth, errors.

Chunk messages (``PushReplicaRequest.chunk`` / ``FetchShardResponse.chunk``) carry up to 4 MiB of
shard bytes each. Building them through the protobuf classes would copy every chunk three times,
so ``encode_stream_message`` writes the protobuf encoding by hand from a memoryview slice (one
copy, by ``bytes.join``), and ``decode_stream_message`` returns the chunk's bytes as a memoryview
into the received message (no copy). Both produce and accept exactly the wire format of
peer_service.proto; header messages go through the generated classes.
Received chunk streams are checked by ``ckptd.core.integrity.StreamVerifier``.
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass
from typing import Any, Final

import grpc

from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.errors import (
    ERROR_METADATA_KEY,
    ERRORS,
    AlreadyExists,
    BudgetExhausted,
    CkptdError,
    FailedPrecondition,
    IntegrityError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TierFailed,
    Timeout,
    Unauthenticated,
)
from ckptd.core.manifest import ReplicaHeader, _shard_from_obj, canonical_json

SERVICE: Final = "ckptd.v1.PeerService"
TOKEN_METADATA_KEY: Final = "ckptd-peer-token"
#: initial metadata of a PushReplica the receiver has room for: the sender streams only after it,
#: so a refused or already-held replica costs one round trip, not the shard's bytes
ACCEPT_METADATA_KEY: Final = "ckptd-replica"
BULK_METADATA_KEY: Final = "ckptd-bulk-bin"  # a serialized BulkTicket, with the accept
MAX_MESSAGE_BYTES: Final = 96 * 2**20  # headers may carry a large layout tree; chunks <= 4 MiB
CHANNEL_OPTIONS: Final = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # a peer that comes back is reconnected within seconds, not after grpc's 2-minute backoff cap
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 3000),
    # each channel its own subchannels: a channel opened after a transport failure (PeerClient
    # retires the failed one) connects at once instead of sharing the old one's backoff state
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS: Final = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


# -- headers and the other messages ------------------------------------------------------------
def header_to_pb(h: ReplicaHeader) -> ppb.ReplicaHeader:
    e = h.entry
    return ppb.ReplicaHeader(
        job=h.job, step=h.step, rank=e.rank, world_size=h.world_size, node_ranks=list(h.node_ranks),
        nbytes=e.nbytes, chunk_bytes=e.chunk_bytes, chunk_crc32c=list(e.chunk_crc32c),
        shard_json=canonical_json(e.to_json()).decode(), source_node=h.source_node,
        created_unix_s=h.created_unix_s, extra_json=canonical_json(dict(h.extra)).decode(),
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"JSON holds {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"JSON holds the non-finite number {text!r}")
    return value


def header_from_pb(m: ppb.ReplicaHeader) -> ReplicaHeader:
    """Parse and validate a header from the wire; InvalidArgument saying what is wrong."""
    try:
        entry = _shard_from_obj(json.loads(m.shard_json, parse_constant=_no_constant, parse_float=_finite))
        extra = json.loads(m.extra_json or "{}", parse_constant=_no_constant, parse_float=_finite)
        if not isinstance(extra, dict):
            raise ValueError("extra_json must be a JSON object")
        if (entry.rank, entry.nbytes, entry.chunk_bytes, entry.chunk_crc32c) != (
                m.rank, m.nbytes, m.chunk_bytes, tuple(m.chunk_crc32c)):
            raise ValueError("rank/nbytes/chunk_bytes/chunk_crc32c differ from the shard_json")
        if not math.isfinite(m.created_unix_s):
            raise ValueError("created_unix_s is not finite")
        h = ReplicaHeader(m.job, m.step, m.world_size, entry, m.source_node, tuple(m.node_ranks),
                          m.created_unix_s, extra)
        return h.validate()
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidArgument(f"bad replica header: {exc}") from None


# -- zero-copy chunk codec ---------------------------------------------------------------------
@dataclass(slots=True)
class RawChunk:
    """A chunk of shard bytes; ``data`` is a view into the sender's buffer or the received message."""

    offset: int
    data: memoryview | bytes
    crc32c: int


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidArgument("truncated or oversized varint in a peer message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _skip(buf: memoryview, pos: int, wire: int) -> int:
    if wire == 0:
        return _read_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 5:
        return pos + 4
    if wire == 2:
        n, pos = _read_varint(buf, pos)
        return pos + n
    raise InvalidArgument(f"unsupported protobuf wire type {wire} in a peer message")


def encode_stream_message(msg: RawChunk | ppb.PushReplicaRequest | ppb.FetchShardResponse) -> bytes:
    """Serializer of PushReplica requests / FetchShard responses (raw chunks by hand, one copy)."""
    if not isinstance(msg, RawChunk):
        return msg.SerializeToString()
    n = len(msg.data)
    prefix = (b"\x08" + _varint(msg.offset) if msg.offset else b"") + (b"\x12" + _varint(n) if n else b"")
    suffix = b"\x18" + _varint(msg.crc32c) if msg.crc32c else b""
    return b"".join((b"\x12", _varint(len(prefix) + n + len(suffix)), prefix, msg.data, suffix))


def _chunk_span(buf: memoryview) -> memoryview | None:
    """The body of field 2 (the chunk) of a top-level message, or None when it has none."""
    pos, end = 0, len(buf)
    span: memoryview | None = None
    while pos < end:
        key, pos = _read_varint(buf, pos)
        if key == 0x12:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise InvalidArgument("truncated peer message")
            span = buf[pos : pos + n]
            pos += n
        else:
            pos = _skip(buf, pos, key & 7)
    if pos != end:
        raise InvalidArgument("truncated peer message")
    return span


def decode_push_request(data: bytes) -> RawChunk | ppb.PushReplicaRequest:
    """Deserializer of PushReplica requests: chunks as views into ``data``, headers parsed."""
    span = _chunk_span(memoryview(data))
    return _decode_chunk(span) if span is not None else ppb.PushReplicaRequest.FromString(data)


def decode_fetch_response(data: bytes) -> RawChunk | ppb.FetchShardResponse:
    """Deserializer of FetchShard responses: chunks as views into ``data``, headers parsed."""
    span = _chunk_span(memoryview(data))
    return _decode_chunk(span) if span is not None else ppb.FetchShardResponse.FromString(data)


def _decode_chunk(buf: memoryview) -> RawChunk:
    pos, end = 0, len(buf)
    offset = crc = 0
    data: memoryview = buf[0:0]
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field_no, wire = key >> 3, key & 7
        if field_no == 1 and wire == 0:
            offset, pos = _read_varint(buf, pos)
        elif field_no == 3 and wire == 0:
            crc, pos = _read_varint(buf, pos)
        elif field_no == 2 and wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise InvalidArgument("truncated chunk in a peer message")
            data = buf[pos : pos + n]
            pos += n
        else:
            pos = _skip(buf, pos, wire)
    if pos != end:
        raise InvalidArgument("truncated chunk in a peer message")
    if crc >= 2**32:
        raise InvalidArgument("chunk crc32c out of range")
    return RawChunk(offset, data, crc)


# -- verification ------------------------------------------------------------------------------
def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def token_matches(metadata: Any, token: bytes) -> bool:
    """Does the call's metadata ((key, value) pairs) carry the peer token (constant-time compare)?"""
    ok = False
    for key, value in metadata or ():
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if key == "authorization" and raw[:7].lower() == b"bearer ":
            ok |= hmac.compare_digest(raw[7:].strip(), token)
        elif key == TOKEN_METADATA_KEY:
            ok |= hmac.compare_digest(raw.strip(), token)
    return ok


# -- errors ------------------------------------------------------------------------------------
_BY_CODE: Final[dict[grpc.StatusCode, type[CkptdError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BudgetExhausted,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_name(err: grpc.aio.AioRpcError) -> str:
    pairs: Any = err.trailing_metadata() or ()
    for key, value in pairs:
        if key == ERROR_METADATA_KEY:
            return value if isinstance(value, str) else bytes(value).decode()
    return ""


def is_transport_failure(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE from the channel (peer down, refused, reset), not a typed servicer error."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and not error_name(err)


def peer_error(err: grpc.aio.AioRpcError, target: str) -> CkptdError:
    """The typed error for a failed peer call: the servicer's own type, else by status code;
    transport failures (down, reset, cancelled) become TierFailed, deadlines Timeout."""
    name = error_name(err)
    details = f"peer {target}: {err.details() or err.code().name}"
    cls = ERRORS.get(name)
    if cls is None:
        cls = _BY_CODE.get(err.code(), TierFailed)
    return cls(details)
