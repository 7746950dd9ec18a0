"""Hostile input on every RPC of both services, sent as raw bytes to one real daemon.

Every case is one request (or one PushReplica stream) pushed through a generic channel with no
serializer (``channel.unary_unary(method, request_serializer=None, ...)``), so malformed,
truncated and non-UTF-8 messages reach the daemon's deserializer exactly as written. Each case
names its RPC, its bytes and the status it must get (the error table of ckptd/errors.py, plus
UNAUTHENTICATED for the peer token); a refusal must also carry the ``ckptd-error`` trailing
metadata naming a class of that code. After every case the daemon must still answer its health
check (and the peer port a Ping); at the end a valid save, restore and replica push still work
and the log holds no traceback. ``test_every_rpc_has_cases`` checks the table covers every RPC
of CheckpointService and PeerService (tests/integration/test_bad_input.py holds more cases of
the save/restore RPCs; this file adds the rest).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckptd import errors
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.errors import ERROR_METADATA_KEY, Unauthenticated
from ckptd.integrity import chunk_crcs, crc32c
from ckptd.layout import TensorEntry
from ckptd.manifest import ShardEntry
from ckptd.peer_client import PeerClient
from ckptd.peer_types import ReplicaHeader
from ckptd.peer_wire import header_to_pb
from ckptd.types import MAX_STEP, MAX_WORLD_SIZE
from tests._ckptd_helpers import Daemon, free_port, running_daemon, unique_job

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


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("hostile")
    port = free_port()
    cfg = work / "ckptd.toml"
    cfg.write_text(f'[memory]\nchunk_bytes = "64KiB"\nwait_timeout_s = 2.0\n'
                   f'[peers]\nlisten = "127.0.0.1:{port}"\nnode_id = "n1"\ntoken = "{TOKEN}"\n'
                   "push_timeout_s = 5.0\n")
    with running_daemon(work, budget="64MiB", extra_args=["--config", str(cfg)]) as d:
        job, partial = unique_job("known"), unique_job("partial")
        managers = [CheckpointManager(job, rank=r, world_size=2, addr=d.addr, on_error="raise") for r in (0, 1)]
        try:
            handles = [m.save(1, {"w": np.arange(4096, dtype=np.float32) + m.rank, "n": m.rank}) for m in managers]
            handles[-1].wait(Level.LOCAL_DURABLE, timeout_s=60)
        finally:
            for m in managers:
                m.close()
        with grpc.insecure_channel(d.target) as ch, grpc.insecure_channel(f"127.0.0.1:{port}") as peer_ch:
            stub = _Stub(ch)
            lease = stub.BeginSave(pb.BeginSaveRequest(job=partial, step=1, rank=0, world_size=2, nbytes=64,
                                                       client_pid=os.getpid()))
            stub.CommitShard(pb.CommitShardRequest(lease_id=lease.lease_id, job=partial, step=1, rank=0,
                                                   world_size=2, nbytes=64, layout=_layout(64)))
            live = stub.BeginSave(pb.BeginSaveRequest(job=unique_job("live"), step=1, rank=0, world_size=1,
                                                      nbytes=64, client_pid=os.getpid()))
            restore = stub.PrepareRestore(pb.PrepareRestoreRequest(job=job, rank=0, world_size=2, step=1,
                                                                   client_pid=os.getpid()))
            assert restore.lease_id and restore.served_from == "memory"
            yield Env(d, ch, peer_ch, f"127.0.0.1:{port}", job, partial, live.lease_id, restore.lease_id,
                      lease.lease_id)


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
        name = None
        for key, value in err.trailing_metadata() or ():
            if key == ERROR_METADATA_KEY:
                name = value if isinstance(value, str) else value.decode()
        return Outcome(err.code(), err.details() or "", name, [])


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


def _cut(msg: Any, n: int = 1) -> bytes:
    data: bytes = msg.SerializeToString()
    return data[:-n]


def _ls_jobs(env: Env, out: list[bytes]) -> None:
    assert env.job in pb.ListJobsResponse.FromString(out[0]).jobs


def _refused_latest(env: Env, out: list[bytes]) -> None:
    resp = pb.DeleteStepResponse.FromString(out[0])
    assert not resp.deleted and any("latest" in r for r in resp.refused), resp
    assert (env.daemon.data_dir / env.job / "step-000000000001" / "manifest.json").is_file()


def _no_pin(env: Env, out: list[bytes]) -> None:
    assert list(pb.PinStepResponse.FromString(out[0]).pinned_steps) == []
    assert not (env.daemon.root / "pins" / "never-saved.json").exists()


def _no_holdings(env: Env, out: list[bytes]) -> None:
    resp = ppb.ListHoldingsResponse.FromString(out[0])
    assert resp.node_id == "n1" and list(resp.holdings) == []


def _status_ok(env: Env, out: list[bytes]) -> None:
    assert pb.DaemonStatusResponse.FromString(out[0]).budget_bytes == 64 * 2**20


def T(name: str = "w", dtype: str = "uint8", shape: list[int] | None = None, offset: int = 0,
      nbytes: int = 64) -> pb.TensorMeta:
    return pb.TensorMeta(name=name, dtype=dtype, shape=[nbytes] if shape is None else shape, offset=offset,
                         nbytes=nbytes)


def _commit(tensors: list[pb.TensorMeta], tree: str = '{"d": [["w", {"t": 0}]]}', **kw: Any) -> Callable[[Env], Any]:
    """A CommitShard on a fresh lease of a fresh job (64 bytes, world_size 1)."""

    def build(env: Env) -> Any:
        job = unique_job("c")
        lease = _Stub(env.ch).BeginSave(pb.BeginSaveRequest(job=job, step=1, rank=0, world_size=1, nbytes=64,
                                                            client_pid=os.getpid()))
        args: dict[str, Any] = {"lease_id": lease.lease_id, "job": job, "step": 1, "rank": 0, "world_size": 1,
                                "nbytes": 64, "layout": pb.ShardLayout(tensors=tensors, tree_json=tree)}
        args.update(kw)
        return pb.CommitShardRequest(**args)
    return build


def _begin(**kw: Any) -> Callable[[Env], Any]:
    def build(env: Env) -> Any:
        args: dict[str, Any] = {"job": unique_job("b"), "step": 1, "rank": 0, "world_size": 1, "nbytes": 64}
        args.update({k: (v(env) if callable(v) else v) for k, v in kw.items()})
        return pb.BeginSaveRequest(**args)
    return build


def _job(f: Callable[[Env], str]) -> Callable[[Env], str]:
    return f


KNOWN = _job(lambda e: e.job)
BIG = "x" * (1 << 20)


def _ckpt_cases() -> list[Case]:
    TO = pb.TensorMeta
    return [
        # BeginSave: ranks, node ranks, sizes, world-size mismatches
        Case("BeginSave", "cut-message", _cut(pb.BeginSaveRequest(job="j", step=1, world_size=1, nbytes=8,
                                                                  client_pid=1, node_ranks=[0, 5000])),
             C.INVALID_ARGUMENT, "malformed"),
        Case("BeginSave", "node-ranks-duplicate", _begin(world_size=4, node_ranks=[0, 0, 1]), C.INVALID_ARGUMENT,
             "twice"),
        Case("BeginSave", "node-ranks-out-of-range", _begin(world_size=2, node_ranks=[0, 2]), C.INVALID_ARGUMENT,
             "node_ranks"),
        Case("BeginSave", "node-ranks-negative", _begin(world_size=2, node_ranks=[-1, 0]), C.INVALID_ARGUMENT,
             "node_ranks"),
        Case("BeginSave", "node-ranks-without-own-rank", _begin(rank=1, world_size=4, node_ranks=[2, 3]),
             C.INVALID_ARGUMENT, "not among"),
        Case("BeginSave", "world-size-over-max", _begin(world_size=MAX_WORLD_SIZE + 1), C.INVALID_ARGUMENT,
             "world_size"),
        Case("BeginSave", "world-size-int32-min", _begin(rank=0, world_size=-(2**31)), C.INVALID_ARGUMENT,
             "world_size"),
        Case("BeginSave", "step-over-max", _begin(step=MAX_STEP + 1), C.INVALID_ARGUMENT, "step"),
        Case("BeginSave", "step-int64-max", _begin(step=2**63 - 1), C.INVALID_ARGUMENT, "step"),
        Case("BeginSave", "world-size-differs-from-committed-step", _begin(job=KNOWN, world_size=3, rank=2),
             C.FAILED_PRECONDITION, "world_size"),
        Case("BeginSave", "rank-of-committed-step", _begin(job=KNOWN, world_size=2, rank=1), C.ALREADY_EXISTS,
             "already"),
        Case("BeginSave", "job-10k-chars", _begin(job="j" * 10_000), C.INVALID_ARGUMENT, "job name"),
        Case("BeginSave", "job-rtl-override", _begin(job="job\u202egpj"), C.INVALID_ARGUMENT, "job name"),
        Case("BeginSave", "job-dot", _begin(job="."), C.INVALID_ARGUMENT, "job name"),
        Case("BeginSave", "job-trailing-slash", _begin(job="job/"), C.INVALID_ARGUMENT, "job name"),
        Case("BeginSave", "nbytes-over-budget-skip", _begin(nbytes=2**30, policy=pb.BACKPRESSURE_SKIP),
             C.RESOURCE_EXHAUSTED, "budget"),
        # CommitShard: dtype/shape/offset/size combinations and leases
        Case("CommitShard", "cut-message", _cut(pb.CommitShardRequest(lease_id="x", job="j", layout=_layout(8))),
             C.INVALID_ARGUMENT, "malformed"),
        Case("CommitShard", "tensor-name-non-utf8",
             b"\x0a\x01x" + b"\x3a\x07" + b"\x0a\x05" + b"\x0a\x03\xc3\x28a", C.INVALID_ARGUMENT, "UTF-8"),
        Case("CommitShard", "lease-1MiB", pb.CommitShardRequest(lease_id=BIG, job="j"), C.NOT_FOUND, "lease"),
        Case("CommitShard", "lease-used", lambda e: pb.CommitShardRequest(lease_id=e.used_lease, job=e.partial_job,
                                                                          step=1, world_size=2, nbytes=64),
             C.NOT_FOUND, "lease"),
        Case("CommitShard", "restore-lease-as-save-lease",
             lambda e: pb.CommitShardRequest(lease_id=e.restore_lease, job=e.job, step=1, world_size=2),
             C.NOT_FOUND, "lease"),
        Case("CommitShard", "dtype-empty", _commit([T(dtype="")]), C.INVALID_ARGUMENT, "dtype"),
        Case("CommitShard", "dtype-nul", _commit([T(dtype="uint8\x00")]), C.INVALID_ARGUMENT, "dtype"),
        Case("CommitShard", "dtype-upper", _commit([T(dtype="UINT8")]), C.INVALID_ARGUMENT, "dtype"),
        Case("CommitShard", "offset-plus-nbytes-wraps", _commit([T(offset=2**64 - 8, nbytes=16, shape=[16])]),
             C.INVALID_ARGUMENT, "outside"),
        Case("CommitShard", "nbytes-2**64-1", _commit([T(nbytes=2**64 - 1, shape=[2**62])]), C.INVALID_ARGUMENT,
             "nbytes"),
        Case("CommitShard", "shape-zero-nbytes-nonzero", _commit([T(shape=[0], nbytes=4)]), C.INVALID_ARGUMENT,
             "nbytes"),
        Case("CommitShard", "shape-int64-min", _commit([T(shape=[-(2**63)], nbytes=0)]), C.INVALID_ARGUMENT,
             "negative"),
        Case("CommitShard", "shape-overflows-int64", _commit([T(dtype="float64", shape=[2**40, 2**40, 2**40],
                                                                 nbytes=64)]), C.INVALID_ARGUMENT, "nbytes"),
        Case("CommitShard", "shape-mismatch-dtype", _commit([T(dtype="float32", shape=[64], nbytes=64)]),
             C.INVALID_ARGUMENT, "nbytes"),
        Case("CommitShard", "ends-past-shard", _commit([T(offset=1, nbytes=64)]), C.INVALID_ARGUMENT, "outside"),
        Case("CommitShard", "name-too-long", _commit([T(name="n" * 1025)]), C.INVALID_ARGUMENT, "name"),
        Case("CommitShard", "adjacent-tensors-accepted",
             _commit([T("a", nbytes=32, shape=[32]), T("b", offset=32, nbytes=32, shape=[32])],
                     '{"l": [{"t": 0}, {"t": 1}]}'), C.OK),  # adjacent, not overlapping: accepted
        Case("CommitShard", "overlap-one-byte",
             _commit([T("a", nbytes=33, shape=[33]), T("b", offset=32, nbytes=32, shape=[32])],
                     '{"l": [{"t": 0}, {"t": 1}]}'), C.INVALID_ARGUMENT, "overlap"),
        Case("CommitShard", "tree-over-64MiB", _commit([], '{"v": "' + "x" * (64 * 2**20) + '"}'),
             C.INVALID_ARGUMENT, "larger"),
        Case("CommitShard", "tree-nan-constant", _commit([], '{"v": NaN}'), C.INVALID_ARGUMENT, "value node"),
        Case("CommitShard", "chunk-bytes-not-the-daemons", _commit([T()], chunk_bytes=4096, chunk_crc32c=[0]),
             C.INVALID_ARGUMENT, "chunk_crc32c"),
        Case("CommitShard", "stall-nan-is-ignored", _commit([T()], client_stall_s=float("nan")), C.OK),
        Case("CommitShard", "stall-negative-inf-is-ignored", _commit([T()], client_stall_s=float("-inf")), C.OK),
        # AbortSave
        Case("AbortSave", "empty-lease", pb.AbortSaveRequest(lease_id=""), C.NOT_FOUND, "lease"),
        Case("AbortSave", "lease-1MiB", pb.AbortSaveRequest(lease_id=BIG), C.NOT_FOUND, "lease"),
        Case("AbortSave", "restore-lease", lambda e: pb.AbortSaveRequest(lease_id=e.restore_lease), C.NOT_FOUND,
             "lease"),
        Case("AbortSave", "lease-prefix", lambda e: pb.AbortSaveRequest(lease_id=e.save_lease[:16]), C.NOT_FOUND,
             "lease"),
        Case("AbortSave", "lease-upper-case", lambda e: pb.AbortSaveRequest(lease_id=e.save_lease.upper()),
             C.NOT_FOUND, "lease"),
        Case("AbortSave", "used-lease", lambda e: pb.AbortSaveRequest(lease_id=e.used_lease), C.NOT_FOUND, "lease"),
        # GetStepStatus
        Case("GetStepStatus", "step-over-max", lambda e: pb.GetStepStatusRequest(job=e.job, step=MAX_STEP + 1),
             C.INVALID_ARGUMENT, "step"),
        Case("GetStepStatus", "job-10k-chars", pb.GetStepStatusRequest(job="j" * 10_000, step=1),
             C.INVALID_ARGUMENT, "job name"),
        Case("GetStepStatus", "step-int64-min", lambda e: pb.GetStepStatusRequest(job=e.job, step=-(2**63)),
             C.INVALID_ARGUMENT, "step"),
        Case("GetStepStatus", "unknown-step", lambda e: pb.GetStepStatusRequest(job=e.job, step=2), C.NOT_FOUND),
        # WaitStep
        Case("WaitStep", "persisted-without-object-tier",
             lambda e: pb.WaitStepRequest(job=e.job, step=1, level=pb.PERSISTED, timeout_ms=100),
             C.FAILED_PRECONDITION, "object"),
        Case("WaitStep", "replicated-without-peers",
             lambda e: pb.WaitStepRequest(job=e.job, step=1, level=pb.REPLICATED, timeout_ms=100),
             C.FAILED_PRECONDITION, "peer"),
        Case("WaitStep", "incomplete-step-times-out",
             lambda e: pb.WaitStepRequest(job=e.partial_job, step=1, level=pb.STAGED, timeout_ms=50),
             C.DEADLINE_EXCEEDED),
        Case("WaitStep", "level-int32-max", lambda e: pb.WaitStepRequest(job=e.job, step=1, level=2**31 - 1),
             C.INVALID_ARGUMENT, "level"),
        Case("WaitStep", "step-over-max", lambda e: pb.WaitStepRequest(job=e.job, step=MAX_STEP + 1, level=1),
             C.INVALID_ARGUMENT, "step"),
        Case("WaitStep", "unknown-step", lambda e: pb.WaitStepRequest(job=e.job, step=77, level=1, timeout_ms=10),
             C.NOT_FOUND),
        # ListSteps
        Case("ListSteps", "job-10k-chars", pb.ListStepsRequest(job="j" * 10_000), C.INVALID_ARGUMENT, "job name"),
        Case("ListSteps", "job-rtl-override", pb.ListStepsRequest(job="a\u202eb"), C.INVALID_ARGUMENT, "job name"),
        Case("ListSteps", "job-absolute", pb.ListStepsRequest(job="/var/lib/ckptd"), C.INVALID_ARGUMENT,
             "job name"),
        Case("ListSteps", "job-dotdot-suffix", pb.ListStepsRequest(job="job.."), C.INVALID_ARGUMENT, ".."),
        # ListJobs
        Case("ListJobs", "4MiB-unknown-field", b"\x0a\x80\x80\x80\x02" + b"x" * (4 * 2**20), C.OK, check=_ls_jobs),
        # PrepareRestore: world-size mismatch, ranks, steps
        Case("PrepareRestore", "world-size-larger",
             lambda e: pb.PrepareRestoreRequest(job=e.job, rank=0, world_size=4, step=1), C.FAILED_PRECONDITION,
             "world_size"),
        Case("PrepareRestore", "world-size-smaller",
             lambda e: pb.PrepareRestoreRequest(job=e.job, rank=0, world_size=1, step=-1), C.FAILED_PRECONDITION,
             "world_size"),
        Case("PrepareRestore", "world-size-mismatch-dry-run",
             lambda e: pb.PrepareRestoreRequest(job=e.job, rank=2, world_size=3, step=1, dry_run=True),
             C.FAILED_PRECONDITION, "world_size"),
        Case("PrepareRestore", "rank-equals-world-size",
             lambda e: pb.PrepareRestoreRequest(job=e.job, rank=2, world_size=2, step=1), C.INVALID_ARGUMENT,
             "world_size"),
        Case("PrepareRestore", "step-over-max",
             lambda e: pb.PrepareRestoreRequest(job=e.job, rank=0, world_size=2, step=MAX_STEP + 1),
             C.INVALID_ARGUMENT, "step"),
        Case("PrepareRestore", "incomplete-step",
             lambda e: pb.PrepareRestoreRequest(job=e.partial_job, rank=0, world_size=2, step=1), C.NOT_FOUND),
        # ReleaseRestore
        Case("ReleaseRestore", "empty-lease", pb.ReleaseRestoreRequest(lease_id=""), C.NOT_FOUND, "lease"),
        Case("ReleaseRestore", "save-lease", lambda e: pb.ReleaseRestoreRequest(lease_id=e.save_lease),
             C.NOT_FOUND, "lease"),
        Case("ReleaseRestore", "lease-1MiB", pb.ReleaseRestoreRequest(lease_id=BIG), C.NOT_FOUND, "lease"),
        Case("ReleaseRestore", "lease-prefix", lambda e: pb.ReleaseRestoreRequest(lease_id=e.restore_lease[:8]),
             C.NOT_FOUND, "lease"),
        # GetManifest
        Case("GetManifest", "step-over-max", lambda e: pb.GetManifestRequest(job=e.job, step=MAX_STEP + 1),
             C.INVALID_ARGUMENT, "step"),
        Case("GetManifest", "job-absolute", pb.GetManifestRequest(job="/etc/passwd", step=-1), C.INVALID_ARGUMENT,
             "job name"),
        Case("GetManifest", "incomplete-step", lambda e: pb.GetManifestRequest(job=e.partial_job, step=1),
             C.NOT_FOUND),
        # DaemonStatus
        Case("DaemonStatus", "unknown-varint-field", b"\x08\x01\x10\xff\xff\xff\xff\x0f", C.OK, check=_status_ok),
        # DeleteStep
        Case("DeleteStep", "job-dotdot", pb.DeleteStepRequest(job="..", step=1), C.INVALID_ARGUMENT, "job name"),
        Case("DeleteStep", "job-traversal", pb.DeleteStepRequest(job="../../etc", step=1, force=True),
             C.INVALID_ARGUMENT, "job name"),
        Case("DeleteStep", "job-absolute", pb.DeleteStepRequest(job="/", step=1, force=True), C.INVALID_ARGUMENT,
             "job name"),
        Case("DeleteStep", "job-empty", pb.DeleteStepRequest(job="", step=1), C.INVALID_ARGUMENT, "job name"),
        Case("DeleteStep", "step-negative", lambda e: pb.DeleteStepRequest(job=e.job, step=-1), C.INVALID_ARGUMENT,
             "step"),
        Case("DeleteStep", "step-over-max", lambda e: pb.DeleteStepRequest(job=e.job, step=MAX_STEP + 1),
             C.INVALID_ARGUMENT, "step"),
        Case("DeleteStep", "tier-unknown", lambda e: pb.DeleteStepRequest(job=e.job, step=1, tier="tape"),
             C.INVALID_ARGUMENT, "tier"),
        Case("DeleteStep", "tier-traversal", lambda e: pb.DeleteStepRequest(job=e.job, step=1, tier="../disk"),
             C.INVALID_ARGUMENT, "tier"),
        Case("DeleteStep", "tier-upper-case", lambda e: pb.DeleteStepRequest(job=e.job, step=1, tier="DISK"),
             C.INVALID_ARGUMENT, "tier"),
        Case("DeleteStep", "tier-peer", lambda e: pb.DeleteStepRequest(job=e.job, step=1, tier="peer"),
             C.INVALID_ARGUMENT, "tier"),
        Case("DeleteStep", "tier-not-configured", lambda e: pb.DeleteStepRequest(job=e.job, step=1, tier="object"),
             C.NOT_FOUND, "object"),
        Case("DeleteStep", "unknown-job", pb.DeleteStepRequest(job="never-saved", step=1, force=True), C.NOT_FOUND),
        Case("DeleteStep", "unknown-step", lambda e: pb.DeleteStepRequest(job=e.job, step=5, force=True),
             C.NOT_FOUND),
        Case("DeleteStep", "latest-without-force", lambda e: pb.DeleteStepRequest(job=e.job, step=1), C.OK,
             check=_refused_latest),
        # PinStep
        Case("PinStep", "job-traversal", pb.PinStepRequest(job="../pins", step=1, pinned=True), C.INVALID_ARGUMENT,
             "job name"),
        Case("PinStep", "job-empty", pb.PinStepRequest(job="", step=1, pinned=True), C.INVALID_ARGUMENT,
             "job name"),
        Case("PinStep", "step-negative", lambda e: pb.PinStepRequest(job=e.job, step=-1, pinned=True),
             C.INVALID_ARGUMENT, "step"),
        Case("PinStep", "step-over-max", lambda e: pb.PinStepRequest(job=e.job, step=MAX_STEP + 1, pinned=True),
             C.INVALID_ARGUMENT, "step"),
        Case("PinStep", "unknown-step", lambda e: pb.PinStepRequest(job=e.job, step=9, pinned=True), C.NOT_FOUND),
        Case("PinStep", "unknown-job", pb.PinStepRequest(job="never-saved", step=1, pinned=True), C.NOT_FOUND),
        Case("PinStep", "unpin-unknown-job-is-a-no-op", pb.PinStepRequest(job="never-saved", step=1, pinned=False),
             C.OK, check=_no_pin),
        # RunRetention
        Case("RunRetention", "job-dotdot", pb.RunRetentionRequest(job=".."), C.INVALID_ARGUMENT, "job name"),
        Case("RunRetention", "job-slash", pb.RunRetentionRequest(job="a/b"), C.INVALID_ARGUMENT, "job name"),
        Case("RunRetention", "tier-memory", pb.RunRetentionRequest(tier="memory"), C.INVALID_ARGUMENT, "memory"),
        Case("RunRetention", "tier-unknown", pb.RunRetentionRequest(tier="tape"), C.INVALID_ARGUMENT, "tier"),
        Case("RunRetention", "tier-upper-case", pb.RunRetentionRequest(tier="Disk"), C.INVALID_ARGUMENT, "tier"),
        Case("RunRetention", "tier-not-configured", pb.RunRetentionRequest(tier="object"), C.NOT_FOUND, "object"),
        Case("RunRetention", "unknown-job", pb.RunRetentionRequest(job="never-saved"), C.NOT_FOUND),
    ] + [Case("CommitShard", f"tensor-meta-{i}", _commit([t]), C.INVALID_ARGUMENT, frag) for i, (t, frag) in enumerate([
        (TO(name="w", dtype="complex256", shape=[4], offset=0, nbytes=64), "dtype"),
        (TO(name="w", dtype="float32", shape=[4, 4, -1], offset=0, nbytes=64), "negative"),
        (TO(name="w", dtype="int64", shape=[1] * 33, offset=0, nbytes=8), "dims"),
    ])]


# -- peer cases --------------------------------------------------------------------------------


def _entry(rank: int, nbytes: int, chunk_bytes: int = 65536, crcs: tuple[int, ...] | None = None) -> ShardEntry:
    n_chunks = -(-nbytes // chunk_bytes)
    return ShardEntry(rank, nbytes, chunk_bytes, crcs if crcs is not None else (0,) * n_chunks,
                      (TensorEntry("w", "uint8", (nbytes,), 0, nbytes),), {"d": [["w", {"t": 0}]]})


def _header(data: bytes, job: str = "peerjob", step: int = 1, rank: int = 0, world_size: int = 2,
            **over: Any) -> ppb.PushReplicaRequest:
    h = ReplicaHeader(job, step, world_size, _entry(rank, len(data), crcs=tuple(chunk_crcs(data, 65536))), "n9",
                      (), 1700000000.0, {"lr": 0.1})
    m = header_to_pb(h)
    for k, v in over.items():
        if isinstance(v, list):
            getattr(m, k)[:] = v
        else:
            setattr(m, k, v)
    return ppb.PushReplicaRequest(header=m)


def _chunk(offset: int, data: bytes, crc: int | None = None) -> ppb.PushReplicaRequest:
    return ppb.PushReplicaRequest(chunk=ppb.ReplicaChunk(offset=offset, data=data,
                                                         crc32c=crc32c(data) if crc is None else crc))


DATA = bytes(range(256)) * 64  # 16 KiB
H = _header(DATA)


def _huge_header() -> ppb.PushReplicaRequest:
    """A consistent header for a 1 TiB shard: no slot can ever hold it."""
    n, cb = 2**40, 2**32 - 4096
    h = ReplicaHeader("peerjob", 3, 1, _entry(0, n, cb), "n9")
    return ppb.PushReplicaRequest(header=header_to_pb(h))


def _peer_cases() -> list[Case]:
    rr = ppb.ReportReadyRequest
    good = {"job": "rjob", "step": 1, "world_size": 2, "tier": "memory", "node_id": "n2", "ranks": [0]}

    def report(**kw: Any) -> ppb.ReportReadyRequest:
        return rr(**{**good, **kw})

    return [
        # PushReplica: stream shape, header consistency, bytes
        Case("PushReplica", "empty-stream", [], C.INVALID_ARGUMENT, "header"),
        Case("PushReplica", "chunk-first", [_chunk(0, DATA), H], C.INVALID_ARGUMENT, "header"),
        Case("PushReplica", "second-header", [H, _chunk(0, DATA[:4096]), H], C.INVALID_ARGUMENT, "second header"),
        Case("PushReplica", "short-stream", [H, _chunk(0, DATA[:4096])], C.INVALID_ARGUMENT),
        Case("PushReplica", "chunk-past-the-end", [H, _chunk(0, DATA + b"x")], C.INVALID_ARGUMENT),
        Case("PushReplica", "chunk-out-of-order", [H, _chunk(4096, DATA[4096:]), _chunk(0, DATA[:4096])],
             C.INVALID_ARGUMENT),
        Case("PushReplica", "chunk-crc-wrong", [H, _chunk(0, DATA, crc32c(DATA) ^ 1)], C.DATA_LOSS),
        Case("PushReplica", "bytes-differ-from-header-crcs", [H, _chunk(0, DATA[::-1])], C.DATA_LOSS),
        Case("PushReplica", "malformed-chunk-after-header", [H, b"\x12\x05ab"], C.INVALID_ARGUMENT, "malformed"),
        Case("PushReplica", "job-dotdot", [_header(DATA, job="..")], C.INVALID_ARGUMENT, "job name"),
        Case("PushReplica", "job-absolute", [_header(DATA, job="/etc")], C.INVALID_ARGUMENT, "job name"),
        Case("PushReplica", "step-negative", [_header(DATA, step=-1)], C.INVALID_ARGUMENT, "step"),
        Case("PushReplica", "rank-out-of-range", [_header(DATA, rank=2)], C.INVALID_ARGUMENT, "world_size"),
        Case("PushReplica", "node-ranks-duplicate", [_header(DATA, node_ranks=[0, 0])], C.INVALID_ARGUMENT,
             "twice"),
        Case("PushReplica", "node-ranks-out-of-range", [_header(DATA, node_ranks=[0, 7])], C.INVALID_ARGUMENT,
             "node_ranks"),
        Case("PushReplica", "world-size-zero", [_header(DATA, world_size=0)], C.INVALID_ARGUMENT, "world_size"),
        Case("PushReplica", "nbytes-differs-from-shard-json", [_header(DATA, nbytes=len(DATA) + 1)],
             C.INVALID_ARGUMENT, "differ"),
        Case("PushReplica", "crc-list-short", [_header(DATA, chunk_crc32c=[])], C.INVALID_ARGUMENT, "differ"),
        Case("PushReplica", "shard-json-not-json", [_header(DATA, shard_json="{")], C.INVALID_ARGUMENT, "header"),
        Case("PushReplica", "shard-json-deep", [_header(DATA, shard_json="[" * 100_000)], C.INVALID_ARGUMENT,
             "header"),
        Case("PushReplica", "extra-not-object", [_header(DATA, extra_json="[1]")], C.INVALID_ARGUMENT, "extra"),
        Case("PushReplica", "extra-nan", [_header(DATA, extra_json='{"a": NaN}')], C.INVALID_ARGUMENT, "header"),
        Case("PushReplica", "created-nan", [_header(DATA, created_unix_s=float("nan"))], C.INVALID_ARGUMENT,
             "finite"),
        Case("PushReplica", "source-node-traversal", [_header(DATA, source_node="../n1")], C.INVALID_ARGUMENT,
             "source node"),
        Case("PushReplica", "one-tebibyte-shard", [_huge_header()], C.RESOURCE_EXHAUSTED),
        # FetchShard
        Case("FetchShard", "job-dotdot", ppb.FetchShardRequest(job="..", step=1), C.INVALID_ARGUMENT, "job name"),
        Case("FetchShard", "job-absolute", ppb.FetchShardRequest(job="/etc/shadow", step=1), C.INVALID_ARGUMENT,
             "job name"),
        Case("FetchShard", "step-negative", lambda e: ppb.FetchShardRequest(job=e.job, step=-1), C.INVALID_ARGUMENT,
             "step"),
        Case("FetchShard", "step-over-max", lambda e: ppb.FetchShardRequest(job=e.job, step=MAX_STEP + 1),
             C.INVALID_ARGUMENT, "step"),
        Case("FetchShard", "rank-negative", lambda e: ppb.FetchShardRequest(job=e.job, step=1, rank=-1),
             C.INVALID_ARGUMENT, "rank"),
        Case("FetchShard", "rank-int32-max", lambda e: ppb.FetchShardRequest(job=e.job, step=1, rank=2**31 - 1),
             C.NOT_FOUND),
        Case("FetchShard", "unknown-job", ppb.FetchShardRequest(job="never-saved", step=1), C.NOT_FOUND),
        Case("FetchShard", "incomplete-step", lambda e: ppb.FetchShardRequest(job=e.partial_job, step=1, rank=1),
             C.NOT_FOUND),
        # ListHoldings
        Case("ListHoldings", "job-dotdot", ppb.ListHoldingsRequest(job=".."), C.INVALID_ARGUMENT, "job name"),
        Case("ListHoldings", "job-slash", ppb.ListHoldingsRequest(job="a/b"), C.INVALID_ARGUMENT, "job name"),
        Case("ListHoldings", "job-129-chars", ppb.ListHoldingsRequest(job="j" * 129), C.INVALID_ARGUMENT,
             "job name"),
        Case("ListHoldings", "unknown-job-holds-nothing", ppb.ListHoldingsRequest(job="never-saved"), C.OK,
             check=_no_holdings),
        # ReportReady
        Case("ReportReady", "job-dotdot", report(job=".."), C.INVALID_ARGUMENT, "job name"),
        Case("ReportReady", "step-negative", report(step=-5), C.INVALID_ARGUMENT, "step"),
        Case("ReportReady", "node-id-traversal", report(node_id="../n2"), C.INVALID_ARGUMENT, "node id"),
        Case("ReportReady", "node-id-empty", report(node_id=""), C.INVALID_ARGUMENT, "node id"),
        Case("ReportReady", "tier-unknown", report(tier="tape"), C.INVALID_ARGUMENT, "tier"),
        Case("ReportReady", "no-ranks", report(ranks=[]), C.INVALID_ARGUMENT, "rank"),
        Case("ReportReady", "ranks-duplicate", report(ranks=[1, 1]), C.INVALID_ARGUMENT, "twice"),
        Case("ReportReady", "rank-out-of-range", report(ranks=[2]), C.INVALID_ARGUMENT, "world_size"),
        Case("ReportReady", "rank-negative", report(ranks=[-1]), C.INVALID_ARGUMENT, "world_size"),
        Case("ReportReady", "world-size-zero", report(world_size=0, ranks=[0]), C.INVALID_ARGUMENT, "world_size"),
        Case("ReportReady", "world-size-over-max", report(world_size=MAX_WORLD_SIZE + 1), C.INVALID_ARGUMENT,
             "world_size"),
        Case("ReportReady", "world-size-mismatch", report(job="rjob2", world_size=2, ranks=[0]), C.OK),
        Case("ReportReady", "world-size-mismatch-second", report(job="rjob2", world_size=3, ranks=[1]),
             C.FAILED_PRECONDITION, "world_size"),
        # Ping
        Case("Ping", "node-id-1MiB-is-ignored", ppb.PingRequest(node_id=BIG), C.OK),
        Case("Ping", "node-id-traversal-is-ignored", ppb.PingRequest(node_id="../../x"), C.OK),
    ]


CASES: list[Case] = _raw_cases() + _ckpt_cases() + _peer_cases()


def test_every_rpc_has_cases() -> None:
    ids = [f"{c.rpc}/{c.name}" for c in CASES]
    assert len(ids) == len(set(ids)), "case names repeat"
    per_rpc = {rpc: sum(c.rpc == rpc for c in CASES) for rpc in CKPT_RPCS + PEER_RPCS}
    assert set(per_rpc) == {c.rpc for c in CASES}  # no case for an RPC that does not exist
    assert all(n >= 6 for n in per_rpc.values()), per_rpc
    assert {"BeginSave", "CommitShard", "AbortSave", "GetStepStatus", "WaitStep", "ListSteps", "ListJobs",
            "PrepareRestore", "ReleaseRestore", "GetManifest", "DaemonStatus", "DeleteStep", "PinStep",
            "RunRetention"} <= set(CKPT_RPCS)
    assert {"PushReplica", "FetchShard", "ListHoldings", "ReportReady", "Ping"} == set(PEER_RPCS)
    assert sum(c.code != C.OK for c in CASES) >= 250
    assert {"BeginSave", "FetchShard", "Ping"} <= STRING_FIELD_1 and "ListJobs" not in STRING_FIELD_1


@pytest.mark.parametrize("case", CASES, ids=[f"{c.rpc}/{c.name}" for c in CASES])
def test_hostile_case(env: Env, case: Case) -> None:
    req = case.req(env) if callable(case.req) else case.req
    got = call(env, case.rpc, _encode(req))
    assert got.code == case.code, (case, got)
    if case.code == C.OK:
        if case.check is not None:
            case.check(env, got.responses)
    else:
        assert got.details and case.fragment in got.details, got
        assert got.error_class in KNOWN_CLASSES, got  # a typed refusal, never an untyped grpc error
        assert KNOWN_CLASSES[got.error_class].code == case.code, got
    healthy(env)


# -- a daemon or peer without the token reads nothing ------------------------------------------


@pytest.mark.parametrize("token", [None, "", "wrong-token-of-enough-length", TOKEN[:-1], TOKEN + "x",
                                   TOKEN.upper()], ids=["none", "empty", "wrong", "prefix", "suffix", "case"])
def test_reading_another_jobs_shard_needs_the_token(env: Env, token: str | None) -> None:
    req = ppb.FetchShardRequest(job=env.job, step=1, rank=0, requester_node="n2").SerializeToString()
    got = call(env, "FetchShard", req, token=token)
    assert got.code == C.UNAUTHENTICATED and got.error_class == "Unauthenticated", got
    assert got.responses == []
    got = call(env, "ListHoldings", ppb.ListHoldingsRequest(job=env.job).SerializeToString(), token=token)
    assert got.code == C.UNAUTHENTICATED and got.responses == []
    healthy(env)


# -- still serving -----------------------------------------------------------------------------


def test_still_serving_after_all_of_it(env: Env) -> None:
    healthy(env)
    # no hostile replica was kept: only the daemon's own shards are held
    held = ppb.ListHoldingsResponse.FromString(call(env, "ListHoldings", b"").responses[0]).holdings
    assert {h.source_node for h in held} == {"n1"}, held
    # a valid replica push and fetch
    data = os.urandom(100_000)

    async def peer_roundtrip() -> bytes:
        client = PeerClient(TOKEN, "n2")
        try:
            h = ReplicaHeader("peerok", 4, 1, _entry(0, len(data), crcs=tuple(chunk_crcs(data, 65536))), "n2")
            await client.push(env.peer_target, h, memoryview(data), 10)
            out = bytearray(len(data))
            await client.fetch_into(env.peer_target, "peerok", 4, 0, memoryview(out), 10)
            return bytes(out)
        finally:
            await client.close()

    assert asyncio.run(peer_roundtrip()) == data
    # a valid save and restore
    job = unique_job("after")
    state = {"w": np.arange(1000, dtype=np.float64), "meta": {"k": 7}}
    with CheckpointManager(job, rank=0, world_size=1, addr=env.daemon.addr, on_error="raise") as m:
        m.save(7, state).wait(Level.LOCAL_DURABLE, timeout_s=60)
        out: dict[str, Any] = {}
        assert m.restore(out) == 7
    assert out["w"].tobytes() == state["w"].tobytes() and out["meta"] == {"k": 7}
    # nothing hostile reached the disk: every job directory is a job some test saved
    names = {p.name for p in env.daemon.data_dir.iterdir()}
    assert env.job in names and job in names and not any(".." in n or n.startswith(".") for n in names)
    log = env.daemon.log()
    assert "Traceback" not in log and "internal error" not in log and "Unexpected" not in log, log[-4000:]
    for line in log.splitlines():
        assert json.loads(line)["level"] != "error", line

