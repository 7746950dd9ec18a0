"""Property-based tests of every RPC of both services against one long-lived daemon.

Hypothesis draws request messages field by field, mixing values that hit the daemon's real state
(a small pool of job names, small steps and ranks, real leases) with adversarial ones (arbitrary
text, int64/uint64 boundaries, NaN and infinities, unknown enum values, mutated layouts, random
and mutated bytes). For every example:

* the call answers OK or one of the statuses the error table (ckptd/errors.py) documents for that
  RPC, never UNKNOWN, INTERNAL or CANCELLED, and a refusal names its error class in the
  ``ckptd-error`` trailing metadata;
* the daemon stays healthy (grpc.health.v1 SERVING, the peer port answers Ping);
* no state invariant breaks: every job it lists is a valid name with a valid directory; a step
  COMMITTED at the memory or disk tier has a manifest whose ranks are exactly its node's ranks and
  every one of them had a CommitShard this test saw accepted (a step is never committed with a
  shard missing); slot bytes never exceed the budget.

One daemon serves the module (``max_examples`` per RPC keeps the whole module near 35 s on
two cores).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ckptd import errors
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.errors import ERROR_METADATA_KEY, Unauthenticated
from ckptd.integrity import chunk_crcs, crc32c
from ckptd.layout import TensorEntry
from ckptd.manifest import Manifest, ShardEntry
from ckptd.peer_types import ReplicaHeader
from ckptd.peer_wire import header_to_pb
from ckptd.types import DTYPE_ITEMSIZE, MAX_STEP, validate_job
from tests._ckptd_helpers import Daemon, free_port, running_daemon

C = grpc.StatusCode
CKPT = "ckptd.v1.CheckpointService"
PEER = "ckptd.v1.PeerService"
TOKEN = "property-peer-token-51c0de9a"
BUDGET = 64 * 2**20
CKPT_RPCS = [m.name for m in pb.DESCRIPTOR.services_by_name["CheckpointService"].methods]
SERVER_STREAMING = {m.name for d, svc in ((pb, "CheckpointService"), (ppb, "PeerService"))
                    for m in d.DESCRIPTOR.services_by_name[svc].methods if m.server_streaming}
PEER_RPCS = [m.name for m in ppb.DESCRIPTOR.services_by_name["PeerService"].methods]
NEVER = {C.UNKNOWN, C.INTERNAL, C.CANCELLED, C.UNIMPLEMENTED}
KNOWN_CLASSES = {**errors.ERRORS, "Unauthenticated": Unauthenticated}

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
    "ReleaseRestore": {_BAD, C.NOT_FOUND},
    "GetManifest": {_BAD, C.NOT_FOUND},
    "DaemonStatus": {_BAD},
    "DeleteStep": {_BAD, C.NOT_FOUND},
    "PinStep": {_BAD, C.NOT_FOUND},
    "RunRetention": {_BAD, C.NOT_FOUND},
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


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("props")
    port = free_port()
    cfg = work / "ckptd.toml"
    cfg.write_text('[memory]\nchunk_bytes = "64KiB"\nwait_timeout_s = 0.5\nslots_per_rank = 2\n'
                   f'[peers]\nlisten = "127.0.0.1:{port}"\nnode_id = "n1"\ntoken = "{TOKEN}"\n'
                   "push_timeout_s = 0.5\n")
    with running_daemon(work, budget="64MiB", extra_args=["--config", str(cfg)]) as d, \
            grpc.insecure_channel(d.target) as ch, grpc.insecure_channel(f"127.0.0.1:{port}") as peer_ch:
        e = Env(d, ch, peer_ch, Model())
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


def _layout(nbytes: int) -> pb.ShardLayout:
    return pb.ShardLayout(tensors=[pb.TensorMeta(name="w", dtype="uint8", shape=[nbytes], offset=0, nbytes=nbytes)],
                          tree_json='{"d": [["w", {"t": 0}]]}')


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
        name = None
        for key, value in err.trailing_metadata() or ():
            if key == ERROR_METADATA_KEY:
                name = value if isinstance(value, str) else value.decode()
        return Answer(err.code(), name, err.details() or "", [])


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


# -- strategies --------------------------------------------------------------------------------

HOSTILE_NAMES = ["", ".", "..", "../x", "/abs", "a/b", "a\x00b", "j" * 129, "jöb", "\u202e", "-x", "a..b", " pa"]
jobs = st.one_of(st.sampled_from(POOL), st.sampled_from(POOL), st.sampled_from(HOSTILE_NAMES), st.text(max_size=20),
                 st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True))
int64s = st.one_of(st.integers(-2, 5), st.integers(0, 2), st.sampled_from([MAX_STEP, MAX_STEP + 1, 2**63 - 1,
                                                                            -(2**63)]),
                   st.integers(-(2**63), 2**63 - 1))
steps = int64s
int32s = st.one_of(st.integers(-2, 4), st.integers(0, 2), st.sampled_from([2**31 - 1, -(2**31), 65536, 65537]),
                   st.integers(-(2**31), 2**31 - 1))
uint64s = st.one_of(st.sampled_from([0, 1, 8, 64, 4096, BUDGET, BUDGET + 1, 2**40, 2**63, 2**64 - 1]),
                    st.integers(0, 2**64 - 1))
uint32s = st.one_of(st.integers(0, 300), st.sampled_from([2**32 - 1, 2**31]), st.integers(0, 2**32 - 1))
doubles = st.floats(allow_nan=True, allow_infinity=True)
enums = st.one_of(st.integers(-1, 6), st.integers(-(2**31), 2**31 - 1))
tiers = st.one_of(st.sampled_from(["", "memory", "disk", "object", "peer", "DISK", "../disk"]), st.text(max_size=8))
lease_ids = st.one_of(st.just(""), st.text(max_size=40), st.from_regex(r"[0-9a-f]{32}", fullmatch=True))
dtypes = st.one_of(st.sampled_from(sorted(DTYPE_ITEMSIZE)), st.sampled_from(["", "float128", "object", "UINT8"]),
                   st.text(max_size=8))
shapes = st.lists(st.one_of(st.integers(0, 70), st.integers(-(2**63), 2**63 - 1)), max_size=5)
tensor_metas = st.builds(pb.TensorMeta, name=st.one_of(st.sampled_from(["w", "b", ""]), st.text(max_size=6)),
                         dtype=dtypes, shape=shapes, offset=uint64s, nbytes=uint64s)
TREES = ['{"d": [["w", {"t": 0}]]}', '{"l": [{"t": 0}, {"t": 1}]}', '{"v": 1}', '{"l": []}', "{", "[" * 2000,
         '{"t": 0}', '{"d": [["w", {"t": 0}], ["w", {"t": 0}]]}', '{"f": "nan"}', '{"v": NaN}']
trees = st.one_of(st.sampled_from(TREES), st.text(max_size=30))
layouts = st.builds(pb.ShardLayout, tensors=st.lists(tensor_metas, max_size=3), tree_json=trees)

EXAMPLES = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _abort(env: Env, lease_id: str) -> None:
    a = checked(env, "AbortSave", pb.AbortSaveRequest(lease_id=lease_id))
    assert a.code in (C.OK, C.NOT_FOUND)


# -- CheckpointService -------------------------------------------------------------------------


@EXAMPLES
@example(req=pb.BeginSaveRequest(job="pc", step=1, rank=0, world_size=1, nbytes=64))
@example(req=pb.BeginSaveRequest(job="..", step=1, rank=0, world_size=1, nbytes=64))
@given(req=st.builds(pb.BeginSaveRequest, job=jobs, step=steps, rank=int32s, world_size=int32s, nbytes=uint64s,
                     policy=enums, wait_timeout_ms=st.integers(0, 200), client_pid=int32s,
                     node_ranks=st.lists(int32s, max_size=4)))
def test_begin_save(env: Env, req: pb.BeginSaveRequest) -> None:
    a = checked(env, "BeginSave", req)
    if a.code == C.OK:
        resp = pb.BeginSaveResponse.FromString(a.responses[0])
        assert resp.slot_capacity_bytes >= req.nbytes and resp.slot_path.startswith(str(env.daemon.shm_dir))
        _abort(env, resp.lease_id)
    invariants(env)


@st.composite
def save_then_commit(draw: st.DrawFn) -> tuple[pb.BeginSaveRequest, pb.CommitShardRequest, bool]:
    """A real BeginSave of the pool's jobs, then a CommitShard whose fields keep or break it."""
    ws = draw(st.sampled_from([1, 2]))
    nbytes = draw(st.sampled_from([0, 8, 64, 4096]))
    begin = pb.BeginSaveRequest(job=draw(st.sampled_from(POOL)), step=draw(st.integers(1, 4)),
                                rank=draw(st.integers(0, ws - 1)), world_size=ws, nbytes=nbytes,
                                client_pid=os.getpid())
    same = {"job": begin.job, "step": begin.step, "rank": begin.rank, "world_size": ws, "nbytes": nbytes}
    fields = {k: draw(st.one_of(st.just(v), {"job": jobs, "step": steps, "rank": int32s, "world_size": int32s,
                                             "nbytes": uint64s}[k])) for k, v in same.items()}
    layout = draw(st.one_of(st.just(_layout(nbytes)), layouts))
    commit = pb.CommitShardRequest(**fields, layout=layout, chunk_bytes=draw(st.sampled_from([0, 65536, 4096])),
                                   chunk_crc32c=draw(st.lists(st.integers(0, 2**32 - 1), max_size=2)),
                                   client_stall_s=draw(doubles))
    return begin, commit, draw(st.booleans())  # last: keep the real lease id (else a random one)


def _pair(step: int, layout: pb.ShardLayout) -> tuple[pb.BeginSaveRequest, pb.CommitShardRequest, bool]:
    ids = {"job": "pc", "step": step, "rank": 0, "world_size": 1, "nbytes": 64}
    return pb.BeginSaveRequest(**ids, client_pid=os.getpid()), pb.CommitShardRequest(**ids, layout=layout), True


@EXAMPLES
@example(case=_pair(3, _layout(64)), other_lease="")
@example(case=_pair(4, pb.ShardLayout(tree_json="{")), other_lease="")
@given(case=save_then_commit(), other_lease=lease_ids)
def test_commit_shard(env: Env, case: tuple[pb.BeginSaveRequest, pb.CommitShardRequest, bool],
                      other_lease: str) -> None:
    begin, commit, real_lease = case
    a = checked(env, "BeginSave", begin)
    if a.code == C.OK:
        lease = pb.BeginSaveResponse.FromString(a.responses[0]).lease_id
        commit.lease_id = lease if real_lease else other_lease
        c = checked(env, "CommitShard", commit)
        if c.code == C.OK:
            assert pb.CommitShardResponse.FromString(c.responses[0]).level == pb.STAGED
            assert (commit.job, commit.step, commit.rank, commit.nbytes) == (begin.job, begin.step, begin.rank,
                                                                             begin.nbytes)
            env.model.committed.setdefault((commit.job, commit.step), set()).add(commit.rank)
        else:
            _abort(env, lease)
    else:
        commit.lease_id = other_lease
        assert checked(env, "CommitShard", commit).code != C.OK
    invariants(env)


@FEW
@given(lease=lease_ids)
def test_abort_save(env: Env, lease: str) -> None:
    assert checked(env, "AbortSave", pb.AbortSaveRequest(lease_id=lease)).code == C.NOT_FOUND
    invariants(env)


@EXAMPLES
@example(job=KEEP, step=1)
@example(job="..", step=1)
@given(job=jobs, step=steps)
def test_get_step_status(env: Env, job: str, step: int) -> None:
    a = checked(env, "GetStepStatus", pb.GetStepStatusRequest(job=job, step=step))
    if a.code == C.OK:
        s = pb.StepStatus.FromString(a.responses[0])
        assert (s.job, s.step) == (job, step) and all(0 <= r < s.world_size for r in s.staged_ranks)
        assert set(s.staged_ranks) <= env.model.committed.get((job, step), set())  # staged only by CommitShard
    invariants(env)


@EXAMPLES
@example(job=KEEP, step=1, level=pb.STAGED, timeout_ms=100)
@example(job=KEEP, step=1, level=99, timeout_ms=100)
@given(job=jobs, step=steps, level=enums, timeout_ms=st.integers(1, 150))
def test_wait_step(env: Env, job: str, step: int, level: int, timeout_ms: int) -> None:
    a = checked(env, "WaitStep", pb.WaitStepRequest(job=job, step=step, level=level, timeout_ms=timeout_ms))
    if a.code == C.OK:
        s = pb.StepStatus.FromString(a.responses[0])
        assert s.level >= min(level, pb.STAGED) or any(t.state == pb.TIER_COMMITTED for t in s.tiers)
    invariants(env)


@FEW
@given(job=jobs)
def test_list_steps(env: Env, job: str) -> None:
    a = checked(env, "ListSteps", pb.ListStepsRequest(job=job))
    if a.code == C.OK:
        resp = pb.ListStepsResponse.FromString(a.responses[0])
        assert resp.job == job and [s.step for s in resp.steps] == sorted(s.step for s in resp.steps)
    invariants(env)


@FEW
@given(data=st.binary(max_size=40))
def test_list_jobs_and_daemon_status_take_any_bytes(env: Env, data: bytes) -> None:
    for rpc in ("ListJobs", "DaemonStatus"):
        a = checked(env, rpc, data)
        assert a.code in (C.OK, C.INVALID_ARGUMENT)
    invariants(env)


@EXAMPLES
@example(req=pb.PrepareRestoreRequest(job=KEEP, rank=0, world_size=1, step=-1))
@example(req=pb.PrepareRestoreRequest(job=KEEP, rank=0, world_size=2, step=1))
@example(req=pb.PrepareRestoreRequest(job="/x", rank=0, world_size=1, step=1))
@given(req=st.builds(pb.PrepareRestoreRequest, job=jobs, rank=int32s, world_size=int32s, step=steps,
                     dry_run=st.booleans(), client_pid=int32s))
def test_prepare_and_release_restore(env: Env, req: pb.PrepareRestoreRequest) -> None:
    a = checked(env, "PrepareRestore", req)
    if a.code == C.OK:
        resp = pb.PrepareRestoreResponse.FromString(a.responses[0])
        assert resp.plan  # some source was planned
        if not req.dry_run:
            assert resp.lease_id and resp.served_from in ("memory", "disk", "peer")
            assert req.step in (-1, resp.step)
            assert checked(env, "ReleaseRestore", pb.ReleaseRestoreRequest(lease_id=resp.lease_id)).code == C.OK
        else:
            assert not resp.lease_id
    invariants(env)


@FEW
@given(lease=lease_ids)
def test_release_restore(env: Env, lease: str) -> None:
    assert checked(env, "ReleaseRestore", pb.ReleaseRestoreRequest(lease_id=lease)).code == C.NOT_FOUND
    invariants(env)


@EXAMPLES
@example(job=KEEP, step=1)
@example(job=KEEP, step=-7)
@given(job=jobs, step=steps)
def test_get_manifest(env: Env, job: str, step: int) -> None:
    a = checked(env, "GetManifest", pb.GetManifestRequest(job=job, step=step))
    if a.code == C.OK:
        m = Manifest.from_json(pb.GetManifestResponse.FromString(a.responses[0]).manifest_json)
        assert m.job == job and (step == -1 or m.step == step)
    invariants(env)


@EXAMPLES
@example(req=pb.DeleteStepRequest(job=KEEP, step=1, dry_run=True))
@example(req=pb.DeleteStepRequest(job=KEEP, step=1, tier="tape"))
@given(req=st.builds(pb.DeleteStepRequest, job=jobs, step=steps, tier=tiers, force=st.booleans(),
                     dry_run=st.booleans()))
def test_delete_step(env: Env, req: pb.DeleteStepRequest) -> None:
    a = checked(env, "DeleteStep", req)
    if a.code == C.OK:
        resp = pb.DeleteStepResponse.FromString(a.responses[0])
        assert all((c.job, c.step) == (req.job, req.step) for c in resp.deleted)
        assert req.tier in ("", *(c.tier for c in resp.deleted)) or not resp.deleted
    invariants(env)


@EXAMPLES
@example(req=pb.PinStepRequest(job=KEEP, step=1, pinned=True))
@example(req=pb.PinStepRequest(job=KEEP, step=-1, pinned=True))
@given(req=st.builds(pb.PinStepRequest, job=jobs, step=steps, pinned=st.booleans()))
def test_pin_step(env: Env, req: pb.PinStepRequest) -> None:
    a = checked(env, "PinStep", req)
    if a.code == C.OK:
        pins = list(pb.PinStepResponse.FromString(a.responses[0]).pinned_steps)
        assert (req.step in pins) == req.pinned and pins == sorted(set(pins))
        pin_file = env.daemon.root / "pins" / f"{req.job}.json"
        assert pin_file.exists() == bool(pins)
        if pins:
            assert json.loads(pin_file.read_text())["steps"] == pins
    invariants(env)


@FEW
@given(req=st.builds(pb.RunRetentionRequest, job=st.one_of(st.just(""), jobs), tier=tiers, dry_run=st.booleans()))
def test_run_retention(env: Env, req: pb.RunRetentionRequest) -> None:
    a = checked(env, "RunRetention", req)
    if a.code == C.OK:
        resp = pb.RunRetentionResponse.FromString(a.responses[0])
        assert {p.tier for p in resp.policies} <= {"disk"}
        assert not req.job or all(c.job == req.job for c in resp.deleted)
    invariants(env)


# -- PeerService -------------------------------------------------------------------------------


@st.composite
def replica_pushes(draw: st.DrawFn) -> list[bytes | ppb.PushReplicaRequest]:
    """A header built from a consistent shard (then maybe one field broken) and its chunks (maybe broken)."""
    data = draw(st.binary(min_size=0, max_size=3000))
    cb = draw(st.sampled_from([1024, 4096, 65536]))
    ws = draw(st.integers(1, 3))
    rank = draw(st.integers(0, ws - 1))
    entry = ShardEntry(rank, len(data), cb, tuple(chunk_crcs(data, cb)),
                       (TensorEntry("w", "uint8", (len(data),), 0, len(data)),), {"d": [["w", {"t": 0}]]})
    h = header_to_pb(ReplicaHeader(draw(st.sampled_from(POOL)), draw(st.integers(1, 6)), ws, entry, "n7"))
    which = draw(st.sampled_from(["none", "job", "step", "rank", "world_size", "node_ranks", "nbytes", "chunk_bytes",
                                  "chunk_crc32c", "shard_json", "source_node", "created_unix_s", "extra_json"]))
    broken = {"job": jobs, "step": steps, "rank": int32s, "world_size": int32s, "nbytes": uint64s,
              "chunk_bytes": uint32s, "source_node": st.text(max_size=10), "created_unix_s": doubles,
              "shard_json": st.one_of(st.text(max_size=20), st.just("[" * 5000)),
              "extra_json": st.one_of(st.text(max_size=20), st.sampled_from(["[]", '{"a": NaN}', "null"])),
              "node_ranks": st.lists(int32s, max_size=4), "chunk_crc32c": st.lists(st.integers(0, 2**32 - 1),
                                                                                     max_size=3)}
    if which in ("node_ranks", "chunk_crc32c"):
        getattr(h, which)[:] = draw(broken[which])
    elif which != "none":
        setattr(h, which, draw(broken[which]))
    msgs: list[bytes | ppb.PushReplicaRequest] = [ppb.PushReplicaRequest(header=h, want_bulk=draw(st.booleans()))]
    cut = draw(st.integers(0, len(data)))
    pieces = [(0, data[:cut]), (cut, data[cut:])] if data else []
    for off, piece in pieces:
        crc = crc32c(piece) ^ draw(st.sampled_from([0, 0, 0, 1]))
        msgs.append(ppb.PushReplicaRequest(chunk=ppb.ReplicaChunk(offset=off + draw(st.sampled_from([0, 0, 0, 1])),
                                                                  data=piece, crc32c=crc)))
    if draw(st.integers(0, 5)) == 0:
        msgs.insert(draw(st.integers(0, len(msgs))), draw(st.binary(max_size=12)))  # raw junk anywhere
    if draw(st.integers(0, 5)) == 0:
        msgs.reverse()
    return msgs


def _valid_push() -> list[bytes | ppb.PushReplicaRequest]:
    data = b"replica bytes" * 100
    entry = ShardEntry(0, len(data), 4096, tuple(chunk_crcs(data, 4096)),
                       (TensorEntry("w", "uint8", (len(data),), 0, len(data)),), {"d": [["w", {"t": 0}]]})
    h = header_to_pb(ReplicaHeader(KEEP + "r", 1, 1, entry, "n7"))
    return [ppb.PushReplicaRequest(header=h),
            ppb.PushReplicaRequest(chunk=ppb.ReplicaChunk(offset=0, data=data, crc32c=crc32c(data)))]


@EXAMPLES
@example(msgs=_valid_push())
@example(msgs=[b"\xff"])
@given(msgs=replica_pushes())
def test_push_replica(env: Env, msgs: list[bytes | ppb.PushReplicaRequest]) -> None:
    a = checked(env, "PushReplica", msgs)
    if a.code == C.OK:
        first = msgs[0]
        assert isinstance(first, ppb.PushReplicaRequest) and first.WhichOneof("body") == "header"
        h = first.header
        resp = ppb.PushReplicaResponse.FromString(a.responses[0])
        assert resp.node_id == "n1" and (resp.already_held or resp.bytes_received == h.nbytes)
        # a kept replica is served back bit-exact and listed
        held = ppb.ListHoldingsResponse.FromString(checked(env, "ListHoldings", ppb.ListHoldingsRequest(
            job=h.job)).responses[0]).holdings
        assert any((x.job, x.step, x.rank) == (h.job, h.step, h.rank) for x in held)
    invariants(env)


@EXAMPLES
@example(req=ppb.FetchShardRequest(job=KEEP, step=1, rank=0))
@example(req=ppb.FetchShardRequest(job=KEEP, step=1, rank=-1))
@given(req=st.builds(ppb.FetchShardRequest, job=jobs, step=steps, rank=int32s, requester_node=st.text(max_size=8),
                     want_bulk=st.just(False)))
def test_fetch_shard(env: Env, req: ppb.FetchShardRequest) -> None:
    a = checked(env, "FetchShard", req)
    if a.code == C.OK:
        first = ppb.FetchShardResponse.FromString(a.responses[0])
        assert first.WhichOneof("body") == "header" and first.tier in ("memory", "disk")
        h = first.header
        assert (h.job, h.step, h.rank) == (req.job, req.step, req.rank)
        data = b"".join(ppb.FetchShardResponse.FromString(r).chunk.data for r in a.responses[1:])
        assert len(data) == h.nbytes and chunk_crcs(data, h.chunk_bytes) == list(h.chunk_crc32c)
    invariants(env)


@FEW
@given(job=st.one_of(st.just(""), jobs), node=st.text(max_size=10))
def test_list_holdings(env: Env, job: str, node: str) -> None:
    a = checked(env, "ListHoldings", ppb.ListHoldingsRequest(job=job, requester_node=node))
    if a.code == C.OK:
        resp = ppb.ListHoldingsResponse.FromString(a.responses[0])
        assert all(job in ("", h.job) and 0 <= h.rank < h.world_size for h in resp.holdings)
    invariants(env)


@EXAMPLES
@example(req=ppb.ReportReadyRequest(job=KEEP, step=1, world_size=1, tier="disk", node_id="n2", ranks=[0]))
@example(req=ppb.ReportReadyRequest(job=KEEP, step=1, world_size=1, tier="tape", node_id="n2", ranks=[0]))
@given(req=st.builds(ppb.ReportReadyRequest, job=jobs, step=steps, world_size=int32s,
                     tier=st.one_of(st.sampled_from(["memory", "peer", "disk", "object"]), tiers),
                     node_id=st.one_of(st.sampled_from(["n2", "n3"]), st.text(max_size=10)),
                     ranks=st.lists(int32s, max_size=4), failed=st.booleans(), message=st.text(max_size=20)))
def test_report_ready(env: Env, req: ppb.ReportReadyRequest) -> None:
    a = checked(env, "ReportReady", req)
    if a.code == C.OK:
        resp = ppb.ReportReadyResponse.FromString(a.responses[0])
        assert resp.coordinator_node == "n1" and resp.world_size == req.world_size
        assert set(req.ranks) <= set(resp.failed_ranks if req.failed else resp.ready_ranks)
        assert not set(resp.ready_ranks) & set(resp.failed_ranks)
        assert resp.complete == (len(resp.ready_ranks) == resp.world_size)
    invariants(env)


@FEW
@given(node=st.text(max_size=50))
def test_ping(env: Env, node: str) -> None:
    a = checked(env, "Ping", ppb.PingRequest(node_id=node))
    assert a.code == C.OK and ppb.PingResponse.FromString(a.responses[0]).node_id == "n1"
    invariants(env)


# -- any bytes, any RPC ------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """Random bytes, or a valid message of the RPC with bytes flipped, cut or inserted."""
    rpc = draw(st.sampled_from(CKPT_RPCS + PEER_RPCS))
    if draw(st.booleans()):
        return rpc, draw(st.binary(max_size=48))
    base = {"BeginSave": pb.BeginSaveRequest(job="pa", step=9, world_size=1, nbytes=64, node_ranks=[0]),
            "CommitShard": pb.CommitShardRequest(lease_id="0" * 32, job="pa", layout=_layout(64)),
            "PushReplica": ppb.PushReplicaRequest(chunk=ppb.ReplicaChunk(offset=0, data=b"abc", crc32c=1)),
            "ReportReady": ppb.ReportReadyRequest(job="pc", step=1, world_size=1, tier="disk", node_id="n2",
                                                  ranks=[0])}.get(rpc)
    data = bytearray(base.SerializeToString() if base is not None else b"\x0a\x02pa\x10\x01")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
    return rpc, bytes(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_any_bytes_to_any_rpc(env: Env, case: tuple[str, bytes]) -> None:
    rpc, data = case
    a = checked(env, rpc, [data] if rpc == "PushReplica" else data, timeout=3.0)
    if a.code == C.OK and rpc == "BeginSave":
        _abort(env, pb.BeginSaveResponse.FromString(a.responses[0]).lease_id)
    if a.code == C.OK and rpc == "PrepareRestore":
        lease = pb.PrepareRestoreResponse.FromString(a.responses[0]).lease_id
        if lease:
            checked(env, "ReleaseRestore", pb.ReleaseRestoreRequest(lease_id=lease))
    if a.code == C.OK and rpc not in ALLOWED and a.responses and hasattr(pb, "RestoreEvent"):
        done = pb.RestoreEvent.FromString(a.responses[-1]).done  # a streamed restore ends with its lease
        if done.lease_id:
            checked(env, "ReleaseRestore", pb.ReleaseRestoreRequest(lease_id=done.lease_id))
    invariants(env)


def test_every_rpc_was_exercised(env: Env) -> None:
    """Runs last in the module: every RPC saw examples, and both outcomes where both exist."""
    calls, codes = env.model.calls, env.model.codes
    assert set(calls) >= set(ALLOWED), sorted(set(ALLOWED) - set(calls))
    for rpc in ("BeginSave", "CommitShard", "GetStepStatus", "PrepareRestore", "GetManifest", "DeleteStep",
                "PinStep", "PushReplica", "FetchShard", "ReportReady"):
        assert "OK" in codes[rpc] and "INVALID_ARGUMENT" in codes[rpc], (rpc, codes[rpc])
    invariants(env)
