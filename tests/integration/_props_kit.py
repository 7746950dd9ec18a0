"""Calling and checking for the property tests of test_rpc_properties.py, and the invariants.

``checked`` sends one request (raw bytes, a message, or a PushReplica stream) to the daemon and
asserts the answer is OK or one of the statuses the error table (ckptd/core/errors.py) documents for
that RPC (``ALLOWED``), never UNKNOWN, INTERNAL or CANCELLED, and that a refusal names its error
class in the ``ckptd-error`` trailing metadata; it also records every call and status in the
``Model``. ``invariants`` checks the daemon stays healthy (grpc.health.v1 SERVING, the peer port
answers Ping) and no state invariant breaks: every job it lists is a valid name with a valid
directory; a step COMMITTED at the memory or disk tier has a manifest whose ranks are exactly its
node's ranks and every one of them had a CommitShard the test saw accepted (a step is never
committed with a shard missing); slot bytes never exceed the budget. ``props_env`` is the
module's daemon with the state the tests start from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.manifest import Manifest
from ckptd.core.types import validate_job
from tests._ckptd_helpers import Daemon, running_peer_daemon
from tests.integration._hostile_kit import CKPT, KNOWN_CLASSES, PEER, PEER_RPCS, C, _layout, error_class

TOKEN = "property-peer-token-51c0de9a"
BUDGET = 64 * 2**20
SERVER_STREAMING = {m.name for d, svc in ((pb, "CheckpointService"), (ppb, "PeerService"))
                    for m in d.DESCRIPTOR.services_by_name[svc].methods if m.server_streaming}
NEVER = {C.UNKNOWN, C.INTERNAL, C.CANCELLED, C.UNIMPLEMENTED}

_BAD = C.INVALID_ARGUMENT
DOCUMENTED = {cls.code for cls in KNOWN_CLASSES.values()} - {C.INTERNAL}  # the error table, less "internal"
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "BeginSave": {_BAD, C.ALREADY_EXISTS, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
    "CommitShard": {_BAD, C.NOT_FOUND, C.RESOURCE_EXHAUSTED},
    "AbortSave": {_BAD, C.NOT_FOUND},
    "GetStepStatus": {_BAD, C.NOT_FOUND},
    "WaitStep": {_BAD, C.NOT_FOUND, C.FAILED_PRECONDITION, C.DEADLINE_EXCEEDED, C.UNAVAILABLE},
    "ListSteps": {_BAD, C.NOT_FOUND},
    "ListJobs": {_BAD},
    "PrepareRestore": {_BAD, C.NOT_FOUND, C.FAILED_PRECONDITION, C.DATA_LOSS, C.UNAVAILABLE, C.RESOURCE_EXHAUSTED},
    "Restore": {_BAD, C.NOT_FOUND, C.FAILED_PRECONDITION, C.DATA_LOSS, C.UNAVAILABLE, C.RESOURCE_EXHAUSTED},
    "ReleaseRestore": {_BAD, C.NOT_FOUND},
    "GetManifest": {_BAD, C.NOT_FOUND},
    "DaemonStatus": {_BAD},
    "DeleteStep": {_BAD, C.NOT_FOUND},
    "PinStep": {_BAD, C.NOT_FOUND},
    "RunRetention": {_BAD, C.NOT_FOUND},
    "SetPeers": {_BAD, C.FAILED_PRECONDITION},
    "PrepareSave": {_BAD, C.RESOURCE_EXHAUSTED, C.UNAVAILABLE},
    "PushReplica": {_BAD, C.DATA_LOSS, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED},
    "FetchShard": {_BAD, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED},
    "ListHoldings": {_BAD},
    "ReportReady": {_BAD, C.FAILED_PRECONDITION},
    "Ping": {_BAD},
}
POOL = ["pa", "pb", "pc"]  # jobs the examples share, so sequences of calls meet real state
KEEP = "keep-1"  # a committed step no drawn example can touch: the explicit OK examples use it


@dataclass
class Model:
    """What the test saw the daemon accept: (job, step) -> ranks whose CommitShard returned OK."""

    committed: dict[tuple[str, int], set[int]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    codes: dict[str, set[str]] = field(default_factory=dict)


@dataclass
class Env:
    daemon: Daemon
    ch: grpc.Channel
    peer_ch: grpc.Channel
    model: Model
    peer_port: int


# -- calling and checking ----------------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    error_class: str | None
    details: str
    responses: list[bytes]


def call(env: Env, rpc: str, payload: bytes | list[bytes], timeout: float = 5.0) -> Answer:
    peer = rpc in PEER_RPCS
    ch = env.peer_ch if peer else env.ch
    method = f"/{PEER if peer else CKPT}/{rpc}"
    md = (("authorization", f"Bearer {TOKEN}"),) if peer else None
    try:
        if rpc == "PushReplica":
            msgs = payload if isinstance(payload, list) else [payload]
            out = [ch.stream_unary(method, request_serializer=None, response_deserializer=None)(
                iter(msgs), metadata=md, timeout=timeout)]
        elif rpc in SERVER_STREAMING:
            assert isinstance(payload, bytes)
            out = list(ch.unary_stream(method, request_serializer=None, response_deserializer=None)(
                payload, metadata=md, timeout=timeout))
        else:
            assert isinstance(payload, bytes)
            out = [ch.unary_unary(method, request_serializer=None, response_deserializer=None)(
                payload, metadata=md, timeout=timeout)]
        return Answer(C.OK, None, "", out)
    except grpc.RpcError as err:
        assert isinstance(err, grpc.Call)
        return Answer(err.code(), error_class(err), err.details() or "", [])


def checked(env: Env, rpc: str, req: Any, timeout: float = 5.0) -> Answer:
    """Call, and assert the answer is OK or a documented, typed refusal of this RPC."""
    payload = req if isinstance(req, bytes) else (
        [m if isinstance(m, bytes) else m.SerializeToString() for m in req] if isinstance(req, list)
        else req.SerializeToString())
    a = call(env, rpc, payload, timeout)
    env.model.calls[rpc] = env.model.calls.get(rpc, 0) + 1
    env.model.codes.setdefault(rpc, set()).add(a.code.name)
    assert a.code == C.OK or a.code in ALLOWED.get(rpc, DOCUMENTED), (rpc, a, req if not isinstance(req, list)
                                                                       else len(req))
    assert a.code not in NEVER
    if a.code != C.OK and not (a.code == C.DEADLINE_EXCEEDED and a.error_class is None):  # a client deadline
        assert a.error_class in KNOWN_CLASSES and KNOWN_CLASSES[a.error_class].code == a.code, a
        assert a.details
    return a


def _ok(env: Env, rpc: str, req: Any) -> bytes:
    a = call(env, rpc, req.SerializeToString(), 60)
    assert a.code == C.OK, (rpc, a)
    return a.responses[0]


def invariants(env: Env) -> None:
    d = env.daemon
    assert d.alive(), d.log()[-3000:]
    health = health_pb2_grpc.HealthStub(env.ch).Check(health_pb2.HealthCheckRequest(service=CKPT), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert checked(env, "Ping", ppb.PingRequest(node_id="inv")).code == C.OK
    status = pb.DaemonStatusResponse.FromString(_ok(env, "DaemonStatus", pb.DaemonStatusRequest()))
    assert status.slot_bytes_in_use <= status.budget_bytes == BUDGET and not status.draining
    for job in pb.ListJobsResponse.FromString(_ok(env, "ListJobs", pb.ListJobsRequest())).jobs:
        validate_job(job)
        for info in pb.ListStepsResponse.FromString(_ok(env, "ListSteps", pb.ListStepsRequest(job=job))).steps:
            committed_at = [t.tier for t in info.tiers if t.state == pb.TIER_COMMITTED]
            if any(t in ("memory", "disk") for t in committed_at):
                assert info.committed
                raw = pb.GetManifestResponse.FromString(_ok(env, "GetManifest", pb.GetManifestRequest(
                    job=job, step=info.step)))
                m = Manifest.from_json(raw.manifest_json)
                ranks = {s.rank for s in m.shards}
                expected = set(m.node_ranks) if m.node_ranks else set(range(m.world_size))
                assert ranks == expected, (job, info.step, ranks, expected)
                seen = env.model.committed.get((job, info.step), set())
                assert ranks <= seen, f"{job}@{info.step} committed at {committed_at} with ranks {ranks - seen} " \
                                      "that no accepted CommitShard staged"
    if d.data_dir.exists():
        for p in d.data_dir.iterdir():
            validate_job(p.name)


def _abort(env: Env, lease_id: str) -> None:
    a = checked(env, "AbortSave", pb.AbortSaveRequest(lease_id=lease_id))
    assert a.code in (C.OK, C.NOT_FOUND)


@contextmanager
def props_env(work: Path) -> Iterator[Env]:
    """A daemon with its peer port open (short waits, 2 slots a rank): pa@1 and keep@1 committed,
    pb@1 staged by rank 0 of 2. On exit it must be alive with no traceback in its log."""
    with running_peer_daemon(work, TOKEN, push_timeout_s=0.5, wait_timeout_s=0.5, slots_per_rank=2) as (d, port), \
            grpc.insecure_channel(d.target) as ch, grpc.insecure_channel(f"127.0.0.1:{port}") as peer_ch:
        e = Env(d, ch, peer_ch, Model(), port)
        for job, ws in (("pa", 1), ("pb", 2), (KEEP, 1)):  # pa@1, keep@1 committed; pb@1 with rank 0 only
            lease = pb.BeginSaveResponse.FromString(_ok(e, "BeginSave", pb.BeginSaveRequest(
                job=job, step=1, rank=0, world_size=ws, nbytes=64, client_pid=os.getpid())))
            _ok(e, "CommitShard", pb.CommitShardRequest(lease_id=lease.lease_id, job=job, step=1, rank=0,
                                                        world_size=ws, nbytes=64, layout=_layout(64)))
            e.model.committed[(job, 1)] = {0}
        for job in ("pa", KEEP):
            _ok(e, "WaitStep", pb.WaitStepRequest(job=job, step=1, level=pb.LOCAL_DURABLE, timeout_ms=30_000))
        yield e
        assert d.alive()
        log = d.log()
        assert "Traceback" not in log and "internal error" not in log, log[-4000:]
