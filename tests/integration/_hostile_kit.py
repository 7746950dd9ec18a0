"""Plumbing of the hostile-RPC tests: raw-byte calls to one real daemon and the case type.

``call`` sends one request (or one PushReplica stream) through a generic channel with no
serializer (``channel.unary_unary(method, request_serializer=None, ...)``), so malformed,
truncated and non-UTF-8 messages reach the daemon's deserializer exactly as written, and returns
the status, details, the ``ckptd-error`` trailing metadata and the response bytes. ``healthy``
checks the daemon still answers its health check and its peer port a Ping. ``Case`` is one row of
the table test_hostile_rpc.py runs: its RPC, its bytes and the status it must get (the error table
of ckptd/core/errors.py, plus UNAUTHENTICATED for the peer token); ``_raw_cases`` builds the rows every
RPC of both services gets: bytes no protobuf parser accepts and non-UTF-8 strings.

The service names, RPC lists (from the services' descriptors), ``KNOWN_CLASSES`` and ``_layout``
are also what test_rpc_properties.py's kit uses, so they are defined here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core import errors
from ckptd.core.errors import ERROR_METADATA_KEY, Unauthenticated
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import ShardEntry
from tests._ckptd_helpers import Daemon

C = grpc.StatusCode
CKPT = "ckptd.v1.CheckpointService"
PEER = "ckptd.v1.PeerService"
TOKEN = "hostile-rpc-peer-token-7f3a9c2e"
# the channel method each RPC needs, from the services' descriptors
KINDS = {m.name: ("stream" if m.client_streaming else "unary") + "_" + ("stream" if m.server_streaming else "unary")
         for d, svc in ((pb, "CheckpointService"), (ppb, "PeerService"))
         for m in d.DESCRIPTOR.services_by_name[svc].methods}
KNOWN_CLASSES = {**errors.ERRORS, "Unauthenticated": Unauthenticated}


@dataclass
class Env:
    daemon: Daemon
    ch: grpc.Channel
    peer_ch: grpc.Channel
    peer_target: str
    job: str  # world_size 2, step 1 committed in memory and on disk
    partial_job: str  # world_size 2, step 1: only rank 0 staged
    save_lease: str  # a live BeginSave lease of another job
    restore_lease: str  # a live restore lease of job rank 0
    used_lease: str  # a save lease already committed


class _Stub:
    """Typed calls over the generic channel (for the fixture's setup only)."""

    def __init__(self, ch: grpc.Channel) -> None:
        self.ch = ch

    def __getattr__(self, rpc: str) -> Callable[[Any], Any]:
        out = {m.name: getattr(pb, m.output_type.name) for m in pb.DESCRIPTOR.services_by_name["CheckpointService"]
               .methods}[rpc]
        fn = self.ch.unary_unary(f"/{CKPT}/{rpc}", request_serializer=None, response_deserializer=out.FromString)
        return lambda req: fn(req.SerializeToString(), timeout=30)


def _layout(nbytes: int) -> pb.ShardLayout:
    return pb.ShardLayout(tensors=[pb.TensorMeta(name="w", dtype="uint8", shape=[nbytes], offset=0, nbytes=nbytes)],
                          tree_json='{"d": [["w", {"t": 0}]]}')


# -- calling -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    error_class: str | None
    responses: list[bytes]


Payload = bytes | list[bytes]
Req = Payload | Any | Callable[[Env], Any]  # raw bytes, a message, a list of either (streams), or built from env


def _encode(value: Any) -> Payload:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, list):
        return [m if isinstance(m, bytes) else m.SerializeToString() for m in value]
    return bytes(value.SerializeToString())


def call(env: Env, rpc: str, payload: Payload, token: str | None = TOKEN, timeout: float = 30) -> Outcome:
    """Send one request (raw bytes) to the RPC; return its status and the response bytes."""
    peer = rpc in PEER_RPCS
    ch, service = (env.peer_ch, PEER) if peer else (env.ch, CKPT)
    method = f"/{service}/{rpc}"
    md = (("authorization", f"Bearer {token}"),) if peer and token is not None else None
    kind = KINDS[rpc]
    fn = getattr(ch, kind)(method, request_serializer=None, response_deserializer=None)
    try:
        if kind == "stream_unary":
            assert isinstance(payload, list)
            out = [fn(iter(payload), metadata=md, timeout=timeout)]
        elif kind == "unary_stream":
            out = list(fn(payload, metadata=md, timeout=timeout))
        else:
            out = [fn(payload, metadata=md, timeout=timeout)]
        return Outcome(C.OK, "", None, out)
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        return Outcome(err.code(), err.details() or "", error_class(err), [])


def error_class(err: grpc.Call) -> str | None:
    """The error class a refusal names in its ``ckptd-error`` trailing metadata, if any."""
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


def healthy(env: Env) -> None:
    """The daemon answers its health check and its peer port answers an authenticated Ping."""
    assert env.daemon.alive(), env.daemon.log()[-3000:]
    resp = health_pb2_grpc.HealthStub(env.ch).Check(health_pb2.HealthCheckRequest(service=CKPT), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    ping = call(env, "Ping", ppb.PingRequest(node_id="probe").SerializeToString())
    assert ping.code == C.OK and ppb.PingResponse.FromString(ping.responses[0]).node_id == "n1"


# -- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    rpc: str
    name: str
    req: Req
    code: grpc.StatusCode  # OK: accepted (and ``check`` looks at the response)
    fragment: str = ""
    check: Callable[[Env, list[bytes]], None] | None = None


CKPT_RPCS = [m.name for m in pb.DESCRIPTOR.services_by_name["CheckpointService"].methods]
PEER_RPCS = [m.name for m in ppb.DESCRIPTOR.services_by_name["PeerService"].methods]
INPUTS = {m.name: m.input_type for d, svc in ((pb, "CheckpointService"), (ppb, "PeerService"))
          for m in d.DESCRIPTOR.services_by_name[svc].methods}
STRING_FIELD_1 = {rpc for rpc, msg in INPUTS.items()
                  if 1 in msg.fields_by_number and msg.fields_by_number[1].type == msg.fields_by_number[1].TYPE_STRING}

# bytes no protobuf parser accepts, whatever the message type
MALFORMED: list[tuple[str, bytes]] = [
    ("wire-type-7", b"\xff\xff\xff"),
    ("truncated-length", b"\x0a\x05ab"),
    ("truncated-varint", b"\x10\xff"),
    ("varint-11-bytes", b"\x10" + b"\xff" * 10 + b"\x01"),
    ("group-never-ended", b"\x0b\x10\x01"),
    ("stray-end-group", b"\x0c"),
    ("truncated-fixed32", b"\x0d\x01\x02"),
]


def _raw_cases() -> list[Case]:
    out: list[Case] = []
    for rpc in CKPT_RPCS + PEER_RPCS:
        for name, data in MALFORMED:
            out.append(Case(rpc, name, [data] if rpc == "PushReplica" else data, C.INVALID_ARGUMENT, "malformed"))
        bad_utf8 = b"\x0a\x03a\xff\xfe"  # field 1, length 3, not UTF-8
        if rpc in STRING_FIELD_1:
            out.append(Case(rpc, "non-utf8-string", bad_utf8, C.INVALID_ARGUMENT, "UTF-8"))
        elif rpc == "PushReplica":  # field 1 is the header: its job is not UTF-8
            out.append(Case(rpc, "non-utf8-header-job", [b"\x0a\x05" + bad_utf8], C.INVALID_ARGUMENT, "UTF-8"))
        else:  # ListJobs, DaemonStatus: no fields; an unknown field is skipped, as protobuf says
            out.append(Case(rpc, "unknown-field", bad_utf8, C.OK))
    return out


def _entry(rank: int, nbytes: int, chunk_bytes: int = 65536, crcs: tuple[int, ...] | None = None) -> ShardEntry:
    n_chunks = -(-nbytes // chunk_bytes)
    return ShardEntry(rank, nbytes, chunk_bytes, crcs if crcs is not None else (0,) * n_chunks,
                      (TensorEntry("w", "uint8", (nbytes,), 0, nbytes),), {"d": [["w", {"t": 0}]]})


BIG = "x" * (1 << 20)
