"""Peer wire units: crc32c combination, the zero-copy chunk codec against protobuf, the one-pass
stream verifier, header conversion and validation, token matching, error typing."""

from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.errors import IntegrityError, InvalidArgument
from ckptd.core.integrity import StreamVerifier, chunk_crcs, combine, crc32c
from ckptd.peers.wire import (
    RawChunk,
    decode_fetch_response,
    decode_push_request,
    encode_stream_message,
    header_from_pb,
    header_to_pb,
    token_matches,
)
from tests.peer._kit import make_header


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc_combine_equals_crc_of_concatenation(a: bytes, b: bytes) -> None:
    assert combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


def test_crc_combine_large_lengths() -> None:
    a, b = os.urandom(1000), os.urandom(5 * 2**20 + 7)
    assert combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)
    with pytest.raises(ValueError):
        combine(1, 2, -1)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**63), st.binary(max_size=2000), st.integers(0, 2**32 - 1))
def test_chunk_codec_matches_protobuf(offset: int, data: bytes, crc: int) -> None:
    ours = encode_stream_message(RawChunk(offset, memoryview(data), crc))
    chunk = ppb.ReplicaChunk(offset=offset, data=data, crc32c=crc)
    assert ours == ppb.PushReplicaRequest(chunk=chunk).SerializeToString()
    assert ours == ppb.FetchShardResponse(chunk=chunk).SerializeToString()
    for decode in (decode_push_request, decode_fetch_response):
        got = decode(ours)
        assert isinstance(got, RawChunk)
        assert (got.offset, bytes(got.data), got.crc32c) == (offset, data, crc)


def test_header_messages_decode_through_protobuf() -> None:
    h = make_header(b"abc")
    push = ppb.PushReplicaRequest(header=header_to_pb(h), want_bulk=True).SerializeToString()
    got = decode_push_request(push)
    assert isinstance(got, ppb.PushReplicaRequest) and got.want_bulk
    assert header_from_pb(got.header) == h
    fetch = ppb.FetchShardResponse(header=header_to_pb(h), tier="disk",
                                   bulk=ppb.BulkTicket(port=9, ticket=b"t" * 16)).SerializeToString()
    got2 = decode_fetch_response(fetch)
    assert isinstance(got2, ppb.FetchShardResponse) and got2.tier == "disk" and got2.bulk.port == 9


@pytest.mark.parametrize("bad", [b"\x12\x05abc", b"\x12\xff", b"\x0f", b"\x12\x03\x12\x05a"])
def test_truncated_or_malformed_messages_are_invalid_argument(bad: bytes) -> None:
    with pytest.raises((InvalidArgument, Exception)):
        decode_push_request(bad)
    with pytest.raises(InvalidArgument):
        decode_push_request(b"\x12\x05abc")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200_000), st.sampled_from([4096, 65536, 100_000]),
       st.lists(st.integers(1, 70_000), min_size=1, max_size=40), st.data())
def test_verifier_accepts_any_split_and_catches_any_flip(n: int, chunk: int, cuts: list[int],
                                                         data: st.DataObject) -> None:
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    expected = chunk_crcs(payload, chunk)
    pieces, off, i = [], 0, 0
    while off < n:
        size = min(cuts[i % len(cuts)], n - off)
        pieces.append((off, payload[off : off + size]))
        off += size
        i += 1
    v = StreamVerifier(n, chunk, expected, max_chunk_bytes=70_000)
    for o, p in pieces:
        v.feed(o, p, crc32c(p))
    v.finish()
    if n:
        # corrupt one byte but send the crc of the corrupt piece: the integrity list catches it
        k = data.draw(st.integers(0, len(pieces) - 1))
        v2 = StreamVerifier(n, chunk, expected, max_chunk_bytes=70_000)
        with pytest.raises(IntegrityError, match="integrity chunk"):
            for j, (o, p) in enumerate(pieces):
                if j == k:
                    p = bytes([p[0] ^ 1]) + p[1:]
                v2.feed(o, p, crc32c(p))
            v2.finish()


def test_verifier_rejects_malformed_streams() -> None:
    data = os.urandom(10_000)
    crcs = chunk_crcs(data, 4096)
    v = StreamVerifier(len(data), 4096, crcs)
    with pytest.raises(InvalidArgument, match="expected 0"):
        v.feed(4096, data[4096:8192], crc32c(data[4096:8192]))
    with pytest.raises(IntegrityError, match="offset 0"):
        v.feed(0, data[:100], crc32c(data[:100]) ^ 1)
    v = StreamVerifier(len(data), 4096, crcs)
    v.feed(0, data[:5000], crc32c(data[:5000]))
    with pytest.raises(InvalidArgument, match="5000 of 10000"):
        v.finish()
    with pytest.raises(InvalidArgument, match="runs past"):
        v.feed(5000, data[5000:] + b"x", crc32c(data[5000:] + b"x"))
    with pytest.raises(InvalidArgument, match="allowed"):
        StreamVerifier(len(data), 4096, crcs, max_chunk_bytes=1000).feed(0, data[:2000], 0)
    with pytest.raises(InvalidArgument, match="does not cover"):
        StreamVerifier(len(data), 4096, crcs[:-1])


def test_header_validation() -> None:
    h = make_header(os.urandom(3000), chunk_bytes=1024, node_ranks=(0, 1))
    assert header_from_pb(header_to_pb(h)) == h
    for field, value in [("job", "../etc"), ("nbytes", 5), ("rank", 7), ("source_node", ""),
                         ("shard_json", "{"), ("extra_json", "[1]"), ("extra_json", '{"x": NaN}'),
                         ("step", -1), ("node_ranks", [1])]:
        m = header_to_pb(h)
        if field == "node_ranks":
            del m.node_ranks[:]
            m.node_ranks.extend(value)  # type: ignore[arg-type]
        else:
            setattr(m, field, value)
        with pytest.raises(InvalidArgument, match="bad replica header"):
            header_from_pb(m)
    m = header_to_pb(h)
    m.chunk_crc32c[0] ^= 1
    with pytest.raises(InvalidArgument, match="differ"):
        header_from_pb(m)


def test_token_matching() -> None:
    tok = b"0123456789abcdef0123"
    assert token_matches([("authorization", "Bearer 0123456789abcdef0123")], tok)
    assert token_matches([("authorization", "bearer 0123456789abcdef0123")], tok)
    assert token_matches([("ckptd-peer-token", "0123456789abcdef0123")], tok)
    assert token_matches([("x", "y"), ("ckptd-peer-token", b"0123456789abcdef0123")], tok)
    assert not token_matches([("authorization", "Bearer 0123456789abcdef012")], tok)
    assert not token_matches([("authorization", "0123456789abcdef0123")], tok)
    assert not token_matches([("ckptd-peer-token", "")], tok)
    assert not token_matches(None, tok)


def test_grpc_status_codes_of_the_new_error() -> None:
    from ckptd.core.errors import Unauthenticated

    assert Unauthenticated.code == grpc.StatusCode.UNAUTHENTICATED
