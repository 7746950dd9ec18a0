"""Property-based tests of every RPC of both services against one long-lived daemon.

Hypothesis draws request messages field by field, real values (known jobs, small steps, real
leases) mixed with adversarial ones (any text, integer bounds, NaN, unknown enums, mutated layouts
and bytes). For every example:

* the call answers OK or a status ckptd/core/errors.py documents for that RPC (never UNKNOWN,
  INTERNAL or CANCELLED), a refusal naming its error class in the ``ckptd-error`` trailer;
* the daemon stays healthy (grpc.health.v1 SERVING, the peer port answers Ping);
* no state invariant breaks: every job listed is a valid name with a valid directory; a COMMITTED
  step's manifest holds exactly its node's ranks, each with a CommitShard seen accepted (never a
  shard missing); slot bytes never exceed the budget.

One daemon serves the module (~35 s on two cores); its setup, the checks and the invariants are in
_props_kit.py, the strategies in _props_strategies.py. One module on purpose: the tests share one
daemon and one ``Model`` of what it accepted, and ``test_every_rpc_was_exercised`` runs last.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.integrity import chunk_crcs
from ckptd.core.manifest import Manifest
from tests.integration._hostile_kit import C, _layout
from tests.integration._props_kit import ALLOWED, KEEP, Env, _abort, _ok, checked, invariants, props_env
from tests.integration._props_strategies import (
    EXAMPLES,
    FEW,
    _pair,
    _valid_push,
    enums,
    int32s,
    jobs,
    lease_ids,
    mutated,
    replica_pushes,
    save_then_commit,
    steps,
    tiers,
    uint64s,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with props_env(tmp_path_factory.mktemp("props")) as e:
        yield e


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


@EXAMPLES
@example(req=pb.PrepareRestoreRequest(job=KEEP, rank=0, world_size=1, step=-1))
@example(req=pb.PrepareRestoreRequest(job=KEEP, rank=0, world_size=1, step=1, dry_run=True))
@example(req=pb.PrepareRestoreRequest(job=KEEP, rank=0, world_size=2, step=1))
@given(req=st.builds(pb.PrepareRestoreRequest, job=jobs, rank=int32s, world_size=int32s, step=steps,
                     dry_run=st.booleans(), client_pid=int32s))
def test_restore_stream(env: Env, req: pb.PrepareRestoreRequest) -> None:
    """The streamed restore: start, verified bytes only growing up to the shard's size, then done
    with a lease the client releases (no source here is damaged, so never a restart)."""
    a = checked(env, "Restore", req)
    assert a.code == C.INVALID_ARGUMENT or not req.dry_run  # a plan is PrepareRestore's job
    if a.code == C.OK:
        events = [pb.RestoreEvent.FromString(r) for r in a.responses]
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) <= {"ready_bytes"}, kinds
        start, done = events[0].start, events[-1].done
        assert start.served_from in ("memory", "disk", "peer") and req.step in (-1, start.step)
        assert done.step == start.step and done.served_from == start.served_from
        ready = [e.ready_bytes for e in events[1:-1]]
        assert ready == sorted(ready) and all(n <= start.nbytes for n in ready)
        assert done.lease_id
        assert checked(env, "ReleaseRestore", pb.ReleaseRestoreRequest(lease_id=done.lease_id)).code == C.OK
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


@EXAMPLES
@example(peers=["n1=127.0.0.1:{port}"])
@example(peers=["n1=127.0.0.1:{port}", "n2=127.0.0.1:1"])
@example(peers=["n2=127.0.0.1:1"])
@example(peers=["n1=127.0.0.1:{port}", "n1=127.0.0.1:2"])
@given(peers=st.lists(st.one_of(st.sampled_from(["n1=127.0.0.1:{port}", "n2=127.0.0.1:1", "n3=[::1]:1"]),
                                st.text(max_size=24)), max_size=4))
def test_set_peers(env: Env, peers: list[str]) -> None:
    """Membership from the job: unique node=host:port entries naming this node, answered with the
    ids sorted; reset to this node alone after (port 1 refuses at once, should a push start)."""
    req = pb.SetPeersRequest(peers=[p.replace("{port}", str(env.peer_port)) for p in peers])
    try:
        a = checked(env, "SetPeers", req)
        if a.code == C.OK:
            members = list(pb.SetPeersResponse.FromString(a.responses[0]).members)
            assert "n1" in members and members == sorted(set(members))
            assert len(members) == len([p for p in req.peers if p.strip()])  # blank entries are skipped
    finally:
        _ok(env, "SetPeers", pb.SetPeersRequest(peers=[f"n1=127.0.0.1:{env.peer_port}"]))
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


@FEW
@example(req=pb.PrepareSaveRequest(job="pp", rank=0, world_size=1, nbytes=4096))
@example(req=pb.PrepareSaveRequest(job="pp", rank=0, world_size=1, nbytes=64, slots=3))
@given(req=st.builds(pb.PrepareSaveRequest, job=jobs, rank=int32s, world_size=int32s, nbytes=uint64s,
                     slots=st.integers(0, 4)))
def test_prepare_save(env: Env, req: pb.PrepareSaveRequest) -> None:
    a = checked(env, "PrepareSave", req, timeout=30.0)
    if a.code == C.OK:  # the rank's slots that fit, never more than slots_per_rank (2 here)
        resp = pb.PrepareSaveResponse.FromString(a.responses[0])
        assert resp.slots_wanted == (req.slots or 2) and len(resp.slots) <= 2
        assert all(s.capacity_bytes >= req.nbytes and (s.job, s.rank) == (req.job, req.rank) for s in resp.slots)
    elif req.slots <= 2 and req.nbytes <= 2**30 and req.job == "pp" and req.world_size == 1 and req.rank == 0:
        assert a.code == C.RESOURCE_EXHAUSTED and req.nbytes > 2**26, a  # only a shard over the budget
    invariants(env)


# -- PeerService -------------------------------------------------------------------------------


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
        assert list(resp.ready_nodes) == sorted(set(resp.ready_nodes))
        assert req.failed or not req.ranks or req.node_id in resp.ready_nodes
    invariants(env)


@FEW
@given(node=st.text(max_size=50))
def test_ping(env: Env, node: str) -> None:
    a = checked(env, "Ping", ppb.PingRequest(node_id=node))
    assert a.code == C.OK and ppb.PingResponse.FromString(a.responses[0]).node_id == "n1"
    invariants(env)


# -- any bytes, any RPC ------------------------------------------------------------------------


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
    for rpc in ("BeginSave", "CommitShard", "GetStepStatus", "PrepareRestore", "Restore", "GetManifest",
                "DeleteStep", "PinStep", "SetPeers", "PushReplica", "FetchShard", "ReportReady"):
        assert "OK" in codes[rpc] and "INVALID_ARGUMENT" in codes[rpc], (rpc, codes[rpc])
    invariants(env)
