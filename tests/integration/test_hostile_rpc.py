"""Hostile input on every RPC of both services, sent as raw bytes to one real daemon.

Every case is one request (or one PushReplica stream) pushed through a generic channel with no
serializer (``channel.unary_unary(method, request_serializer=None, ...)``), so malformed,
truncated and non-UTF-8 messages reach the daemon's deserializer exactly as written. Each case
names its RPC, its bytes and the status it must get (the error table of ckptd/core/errors.py, plus
UNAUTHENTICATED for the peer token); a refusal must also carry the ``ckptd-error`` trailing
metadata naming a class of that code. After every case the daemon must still answer its health
check (and the peer port a Ping); at the end a valid save, restore and replica push still work
and the log holds no traceback. ``test_every_rpc_has_cases`` checks the table covers every RPC
of CheckpointService and PeerService (tests/integration/test_bad_input.py holds more cases of
the save/restore RPCs; this file adds the rest).

The table's rows live beside this module: the malformed and non-UTF-8 rows of every RPC and the
calling plumbing in _hostile_kit.py, the CheckpointService rows in _hostile_ckpt_cases.py, the
PeerService rows in _hostile_peer_cases.py. The tests stay in this one module on purpose: they
share one daemon (the module-scoped ``env``), some rows depend on rows before them, and the last
test checks what all of them left behind (no hostile replica kept, nothing hostile on disk, no
error in the log), so it must run after every case on the same daemon.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.integrity import chunk_crcs
from ckptd.core.manifest import ReplicaHeader
from tests._ckptd_helpers import replica_round_trip, running_peer_daemon, unique_job
from tests.integration._hostile_ckpt_cases import _ckpt_cases
from tests.integration._hostile_kit import (
    CKPT_RPCS,
    KNOWN_CLASSES,
    PEER_RPCS,
    STRING_FIELD_1,
    TOKEN,
    C,
    Case,
    Env,
    _encode,
    _entry,
    _layout,
    _raw_cases,
    _Stub,
    call,
    healthy,
)
from tests.integration._hostile_peer_cases import _peer_cases


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("hostile")
    with running_peer_daemon(work, TOKEN, wait_timeout_s=2.0) as (d, port):
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
    h = ReplicaHeader("peerok", 4, 1, _entry(0, len(data), crcs=tuple(chunk_crcs(data, 65536))), "n2")
    assert replica_round_trip(env.peer_target, TOKEN, h, data) == data
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

