"""Bad and hostile input on every RPC gets a precise gRPC status, and the daemon keeps serving.

Raw stub calls over the daemon's Unix socket (no client-side validation in the way). Each case
asserts the exact status code, a message that says what is wrong, and the ``ckptd-error``
trailing metadata naming the error class. One daemon serves the module; the last test checks it
is still alive and still saves and restores. The client-side half checks that CheckpointManager
raises the typed errors of ckptd.core.errors.

The raw-call helpers (``expect``, ``begin``, ``commit_req``, ``write_slot``, ``save_ok``) live in
_bad_input_kit.py. The tests stay in this one module on purpose: they share one daemon, and the
last one checks that daemon after all the others (still alive, still saving and restoring, no
internal error or traceback in its log).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from ckptd_client import CheckpointManager, Level

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from ckptd.core import errors
from ckptd.core.integrity import crc32c
from ckptd.core.types import validate_job
from tests._ckptd_helpers import Daemon, running_daemon, unique_job
from tests.integration._bad_input_kit import begin, commit_req, expect, save_ok, write_slot

C = grpc.StatusCode
BUDGET = 64 * 2**20


@pytest.fixture(scope="module")
def mod_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    env = {"CKPTD_MEMORY_MAX_SHARD_BYTES": "1TiB", "CKPTD_MEMORY_BACKPRESSURE": "wait"}
    with running_daemon(tmp_path_factory.mktemp("badinput"), budget="64MiB", env=env) as d:
        yield d


@pytest.fixture(scope="module")
def stub(mod_daemon: Daemon) -> Iterator[pb_grpc.CheckpointServiceStub]:
    with grpc.insecure_channel(mod_daemon.target) as ch:
        yield pb_grpc.CheckpointServiceStub(ch)


@pytest.fixture(scope="module")
def known_job(stub: pb_grpc.CheckpointServiceStub) -> str:
    """A job with step 1 committed on disk."""
    job = unique_job("known")
    save_ok(stub, job, 1)
    return job


# -- unknown things ------------------------------------------------------------------------------


def test_unknown_job(stub: pb_grpc.CheckpointServiceStub) -> None:
    job = "no-such-job"
    expect(stub.GetStepStatus, pb.GetStepStatusRequest(job=job, step=1), C.NOT_FOUND, job)
    expect(stub.ListSteps, pb.ListStepsRequest(job=job), C.NOT_FOUND, job)
    expect(stub.WaitStep, pb.WaitStepRequest(job=job, step=1, level=pb.STAGED, timeout_ms=100), C.NOT_FOUND, job)
    expect(stub.PrepareRestore, pb.PrepareRestoreRequest(job=job, rank=0, world_size=1, step=-1), C.NOT_FOUND, job)
    expect(stub.PrepareRestore, pb.PrepareRestoreRequest(job=job, rank=0, world_size=1, step=3), C.NOT_FOUND, job)
    expect(stub.PrepareRestore, pb.PrepareRestoreRequest(job=job, rank=0, world_size=1, step=-1, dry_run=True),
           C.NOT_FOUND)
    expect(stub.GetManifest, pb.GetManifestRequest(job=job, step=-1), C.NOT_FOUND)
    expect(stub.GetManifest, pb.GetManifestRequest(job=job, step=2), C.NOT_FOUND)


def test_unknown_step_of_a_known_job(stub: pb_grpc.CheckpointServiceStub, known_job: str) -> None:
    f = expect(stub.GetStepStatus, pb.GetStepStatusRequest(job=known_job, step=99), C.NOT_FOUND, "99")
    assert f.error_class == "NotFound"
    expect(stub.PrepareRestore, pb.PrepareRestoreRequest(job=known_job, rank=0, world_size=1, step=99),
           C.NOT_FOUND)
    expect(stub.GetManifest, pb.GetManifestRequest(job=known_job, step=99), C.NOT_FOUND)


def test_unknown_leases(stub: pb_grpc.CheckpointServiceStub) -> None:
    fake = pb.BeginSaveResponse(lease_id="0" * 32)
    f = expect(stub.CommitShard, commit_req(fake, "j"), C.NOT_FOUND, "lease")
    assert f.error_class == "NotFound"
    expect(stub.CommitShard, commit_req(pb.BeginSaveResponse(lease_id=""), "j"), C.NOT_FOUND, "lease")
    expect(stub.AbortSave, pb.AbortSaveRequest(lease_id="nope"), C.NOT_FOUND, "lease")
    expect(stub.ReleaseRestore, pb.ReleaseRestoreRequest(lease_id="nope"), C.NOT_FOUND, "lease")


# -- steps, names, ranks, sizes ---------------------------------------------------------------------


@pytest.mark.parametrize("step", [-1, -2, -(2**63), 10**12])
def test_bad_steps(stub: pb_grpc.CheckpointServiceStub, known_job: str, step: int) -> None:
    expect(stub.BeginSave, pb.BeginSaveRequest(job="fresh-job", step=step, rank=0, world_size=1, nbytes=8),
           C.INVALID_ARGUMENT, "step")
    expect(stub.GetStepStatus, pb.GetStepStatusRequest(job=known_job, step=step), C.INVALID_ARGUMENT, "step")
    expect(stub.WaitStep, pb.WaitStepRequest(job=known_job, step=step, level=pb.STAGED, timeout_ms=100),
           C.INVALID_ARGUMENT, "step")
    if step != -1:  # -1 means "latest" where a step is optional
        expect(stub.PrepareRestore, pb.PrepareRestoreRequest(job=known_job, rank=0, world_size=1, step=step),
               C.INVALID_ARGUMENT, "step")
        expect(stub.GetManifest, pb.GetManifestRequest(job=known_job, step=step), C.INVALID_ARGUMENT, "step")


BAD_JOBS = ["..", "../etc", "a/../b", "a/b", "/etc/passwd", "/", "", "x" * 129, "jöb", "日本", "a..b",
            ".hidden", "-dash", "sp ace", "tab\t", "new\nline", "job\n", "job\r\n", "nul\x00", "back\\slash",
            "~root", "*"]


@pytest.mark.parametrize("job", BAD_JOBS, ids=[repr(j)[:20] for j in BAD_JOBS])
def test_bad_job_names(stub: pb_grpc.CheckpointServiceStub, mod_daemon: Daemon, job: str) -> None:
    expect(stub.BeginSave, pb.BeginSaveRequest(job=job, step=1, rank=0, world_size=1, nbytes=8),
           C.INVALID_ARGUMENT, "job name")
    expect(stub.GetStepStatus, pb.GetStepStatusRequest(job=job, step=1), C.INVALID_ARGUMENT, "job name")
    expect(stub.ListSteps, pb.ListStepsRequest(job=job), C.INVALID_ARGUMENT, "job name")
    expect(stub.WaitStep, pb.WaitStepRequest(job=job, step=1, level=pb.STAGED, timeout_ms=100),
           C.INVALID_ARGUMENT, "job name")
    expect(stub.PrepareRestore, pb.PrepareRestoreRequest(job=job, rank=0, world_size=1, step=-1),
           C.INVALID_ARGUMENT, "job name")
    expect(stub.GetManifest, pb.GetManifestRequest(job=job, step=-1), C.INVALID_ARGUMENT, "job name")
    # nothing was created for it: every directory of the disk tier is a valid job name
    if mod_daemon.data_dir.exists():
        for p in mod_daemon.data_dir.iterdir():
            validate_job(p.name)


def test_longest_valid_job_name_is_accepted(stub: pb_grpc.CheckpointServiceStub) -> None:
    job = "j" * 128
    save_ok(stub, job, 1)
    assert stub.GetStepStatus(pb.GetStepStatusRequest(job=job, step=1), timeout=20).level == pb.LOCAL_DURABLE


@pytest.mark.parametrize("rank,world_size", [(1, 1), (2, 2), (-1, 1), (0, 0), (0, -1), (0, 65537),
                                             (2**31 - 1, 4), (-(2**31), 2)])
def test_rank_outside_world_size(stub: pb_grpc.CheckpointServiceStub, known_job: str, rank: int,
                                 world_size: int) -> None:
    expect(stub.BeginSave, pb.BeginSaveRequest(job="ranks-job", step=1, rank=rank, world_size=world_size, nbytes=8),
           C.INVALID_ARGUMENT, "world_size")
    expect(stub.PrepareRestore, pb.PrepareRestoreRequest(job=known_job, rank=rank, world_size=world_size, step=-1),
           C.INVALID_ARGUMENT, "world_size")


def test_absurd_sizes(stub: pb_grpc.CheckpointServiceStub, mod_daemon: Daemon) -> None:
    # Beyond memory.max_shard_bytes (1 TiB): rejected as an invalid argument, naming the limit.
    for nbytes in (2**64 - 1, 2**63, 2**41):
        expect(stub.BeginSave, pb.BeginSaveRequest(job="sizes", step=1, rank=0, world_size=1, nbytes=nbytes),
               C.INVALID_ARGUMENT, "nbytes", "max_shard_bytes")
    # Plausible but larger than the whole shm budget: no slot can ever hold it -> RESOURCE_EXHAUSTED
    # at once (under either policy), saying which budget, and nothing was allocated.
    for policy in (pb.BACKPRESSURE_DEFAULT, pb.BACKPRESSURE_WAIT, pb.BACKPRESSURE_SKIP):
        f = expect(stub.BeginSave, pb.BeginSaveRequest(job="sizes", step=1, rank=0, world_size=1, nbytes=2**40,
                                                       policy=policy), C.RESOURCE_EXHAUSTED, "budget")
        assert f.error_class == "BudgetExhausted"
        assert "memory.budget_bytes" in f.details
    status = stub.DaemonStatus(pb.DaemonStatusRequest(), timeout=20)
    assert status.slot_bytes_in_use <= status.budget_bytes == BUDGET
    assert mod_daemon.alive()


def test_step_already_committed(stub: pb_grpc.CheckpointServiceStub, known_job: str) -> None:
    f = expect(stub.BeginSave, pb.BeginSaveRequest(job=known_job, step=1, rank=0, world_size=1, nbytes=64),
               C.ALREADY_EXISTS, "already")
    assert f.error_class == "AlreadyExists"


def test_step_being_saved_by_another_writer(stub: pb_grpc.CheckpointServiceStub) -> None:
    job = unique_job("writers")
    lease = begin(stub, job, 1)
    expect(stub.BeginSave, pb.BeginSaveRequest(job=job, step=1, rank=0, world_size=1, nbytes=64),
           C.ALREADY_EXISTS, "another writer")
    stub.AbortSave(pb.AbortSaveRequest(lease_id=lease.lease_id), timeout=20)
    expect(stub.AbortSave, pb.AbortSaveRequest(lease_id=lease.lease_id), C.NOT_FOUND)  # gone
    save_ok(stub, job, 1)  # after the abort the step can be saved


def test_world_size_differs_from_the_step_being_saved(stub: pb_grpc.CheckpointServiceStub) -> None:
    job = unique_job("ws")
    lease = begin(stub, job, 1, rank=0, world_size=2)
    write_slot(lease, b"\x00" * 64)
    stub.CommitShard(commit_req(lease, job, world_size=2), timeout=20)
    expect(stub.BeginSave, pb.BeginSaveRequest(job=job, step=1, rank=1, world_size=3, nbytes=64),
           C.FAILED_PRECONDITION, "world_size")
    expect(stub.BeginSave, pb.BeginSaveRequest(job=job, step=1, rank=0, world_size=2, nbytes=64),
           C.ALREADY_EXISTS)  # rank 0 is staged already


# -- CommitShard ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("job", "other-job"), ("step", 2), ("rank", 1), ("world_size", 3),
                                         ("nbytes", 128), ("nbytes", 65)])
def test_commit_must_match_its_begin(stub: pb_grpc.CheckpointServiceStub, field: str, value: Any) -> None:
    job = unique_job("match")
    lease = begin(stub, job, 1, world_size=2)
    args: dict[str, Any] = {"job": job, "step": 1, "rank": 0, "world_size": 2, "nbytes": 64}
    args[field] = value
    expect(stub.CommitShard, commit_req(lease, **args), C.INVALID_ARGUMENT, "does not match")
    # the lease survives a rejected commit: the right one still goes through
    write_slot(lease, b"\x02" * 64)
    assert stub.CommitShard(commit_req(lease, job, world_size=2), timeout=20).level == pb.STAGED
    expect(stub.CommitShard, commit_req(lease, job, world_size=2), C.NOT_FOUND, "lease")  # used up


def test_commit_may_pack_below_its_begin(stub: pb_grpc.CheckpointServiceStub) -> None:
    """A shard packed after staging (DCP's planner dropped a replica) commits fewer bytes than leased."""
    job = unique_job("packed")
    lease = begin(stub, job, 1, world_size=2)  # 64 bytes leased
    write_slot(lease, b"\x03" * 64)
    assert stub.CommitShard(commit_req(lease, job, world_size=2, nbytes=32), timeout=20).level == pb.STAGED


def T(name: str, dtype: str, shape: list[int], offset: int, nbytes: int) -> pb.TensorMeta:
    return pb.TensorMeta(name=name, dtype=dtype, shape=shape, offset=offset, nbytes=nbytes)


def tree(n: int) -> str:
    return json.dumps({"l": [{"t": i} for i in range(n)]})


BAD_LAYOUTS: list[tuple[str, list[pb.TensorMeta], str, str]] = [
    ("overlap", [T("a", "float32", [8], 0, 32), T("b", "float32", [8], 16, 32)], tree(2), "overlap"),
    ("out-of-range", [T("a", "float32", [8], 48, 32)], tree(1), "outside"),
    ("offset-huge", [T("a", "uint8", [1], 2**64 - 1, 1)], tree(1), "outside"),
    ("nbytes-mismatch", [T("a", "float32", [8], 0, 30)], tree(1), "nbytes"),
    ("shape-negative", [T("a", "float32", [-8], 0, 32)], tree(1), "negative"),
    ("shape-huge", [T("a", "float32", [2**62, 2**62], 0, 16)], tree(1), "nbytes"),
    ("too-many-dims", [T("a", "float32", [1] * 33, 0, 4)], tree(1), "dims"),
    ("bad-dtype", [T("a", "float128", [2], 0, 32)], tree(1), "dtype"),
    ("object-dtype", [T("a", "object", [2], 0, 16)], tree(1), "dtype"),
    ("empty-name", [T("", "float32", [2], 0, 8)], tree(1), "name"),
    ("duplicate-name", [T("a", "float32", [2], 0, 8), T("a", "float32", [2], 8, 8)], tree(2), "duplicate"),
    ("tree-not-json", [], "{not json", "JSON"),
    ("tree-empty", [], "", "JSON"),
    ("tree-bad-node", [], '{"x": 1}', "kind"),
    ("tree-not-object", [], "[1, 2]", "one key"),
    ("tree-deep", [], '{"l":[' * 70 + '{"v":1}' + "]}" * 70, "deeper"),
    ("tree-very-deep", [], "[" * 100_000, "JSON"),
    ("tree-unreferenced", [T("a", "float32", [2], 0, 8)], '{"d": []}', "references 0 of 1"),
    ("tree-twice", [T("a", "float32", [2], 0, 8)], '{"l": [{"t": 0}, {"t": 0}]}', "twice"),
    ("tree-index-out-of-range", [T("a", "float32", [2], 0, 8)], '{"t": 5}', "out of range"),
    ("tree-bad-value", [], '{"v": [1, 2]}', "value node"),
    ("tree-bad-float", [], '{"f": "pi"}', "float"),
]


@pytest.mark.parametrize("tensors,tree_json,fragment", [(t, j, f) for _, t, j, f in BAD_LAYOUTS],
                         ids=[i for i, _, _, _ in BAD_LAYOUTS])
def test_bad_layouts(stub: pb_grpc.CheckpointServiceStub, tensors: list[pb.TensorMeta], tree_json: str,
                     fragment: str) -> None:
    job = unique_job("layout")
    lease = begin(stub, job, 1)
    req = commit_req(lease, job, layout=pb.ShardLayout(tensors=tensors, tree_json=tree_json))
    f = expect(stub.CommitShard, req, C.INVALID_ARGUMENT, fragment)
    assert f.error_class == "InvalidArgument"
    stub.AbortSave(pb.AbortSaveRequest(lease_id=lease.lease_id), timeout=20)
    expect(stub.GetStepStatus, pb.GetStepStatusRequest(job=job, step=1), C.NOT_FOUND)  # nothing recorded


@pytest.mark.parametrize("ncrcs,chunk_bytes", [(2, None), (5, None), (1, 4096), (1, 0)])
def test_wrong_chunk_crc_list(stub: pb_grpc.CheckpointServiceStub, ncrcs: int, chunk_bytes: int | None) -> None:
    job = unique_job("crclen")
    lease = begin(stub, job, 1)
    assert lease.chunk_bytes >= 64  # one chunk covers the 64-byte shard
    req = commit_req(lease, job, chunk_bytes=lease.chunk_bytes if chunk_bytes is None else chunk_bytes,
                     chunk_crc32c=[0] * ncrcs)
    expect(stub.CommitShard, req, C.INVALID_ARGUMENT, "chunk_crc32c")
    stub.AbortSave(pb.AbortSaveRequest(lease_id=lease.lease_id), timeout=20)


def test_client_crc_that_does_not_match_the_slot(stub: pb_grpc.CheckpointServiceStub) -> None:
    """The right number of sums but the wrong values: the shard is never STAGED nor restorable."""
    job = unique_job("crcval")
    data = b"\x05" * 64
    lease = begin(stub, job, 1)
    write_slot(lease, data)
    req = commit_req(lease, job, chunk_bytes=lease.chunk_bytes, chunk_crc32c=[crc32c(data) ^ 1])
    assert stub.CommitShard(req, timeout=20).level == pb.STAGED  # accepted; verified off the hot path
    f = expect(stub.WaitStep, pb.WaitStepRequest(job=job, step=1, level=pb.STAGED, timeout_ms=30_000),
               C.UNAVAILABLE, "crc32c")
    assert f.error_class == "TierFailed"
    expect(stub.PrepareRestore, pb.PrepareRestoreRequest(job=job, rank=0, world_size=1, step=1), C.NOT_FOUND)
    # the honest retry of the same step succeeds
    lease = begin(stub, job, 1)
    write_slot(lease, data)
    stub.CommitShard(commit_req(lease, job, chunk_bytes=lease.chunk_bytes, chunk_crc32c=[crc32c(data)]),
                     timeout=20)
    st = stub.WaitStep(pb.WaitStepRequest(job=job, step=1, level=pb.LOCAL_DURABLE, timeout_ms=60_000), timeout=70)
    assert st.level == pb.LOCAL_DURABLE


# -- enums -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 5, 99, -1])
def test_unknown_level_in_wait_step(stub: pb_grpc.CheckpointServiceStub, known_job: str, level: int) -> None:
    expect(stub.WaitStep, pb.WaitStepRequest(job=known_job, step=1, level=level, timeout_ms=1000),
           C.INVALID_ARGUMENT, "level")


@pytest.mark.parametrize("policy", [3, 99, -1])
def test_unknown_backpressure_policy(stub: pb_grpc.CheckpointServiceStub, policy: int) -> None:
    job = unique_job("policy")
    expect(stub.BeginSave, pb.BeginSaveRequest(job=job, step=1, rank=0, world_size=1, nbytes=8, policy=policy),
           C.INVALID_ARGUMENT, "policy")
    lease = begin(stub, job, 1, policy=pb.BACKPRESSURE_SKIP)  # nothing was leased by the bad call
    stub.AbortSave(pb.AbortSaveRequest(lease_id=lease.lease_id), timeout=20)


# -- the client's typed errors -------------------------------------------------------------------------


def test_client_raises_typed_errors(mod_daemon: Daemon, known_job: str) -> None:
    addr = mod_daemon.addr
    with CheckpointManager(known_job, rank=0, world_size=1, addr=addr, on_error="raise") as m:
        with pytest.raises(errors.AlreadyExists, match="already"):
            m.save(1, {"w": np.zeros(16, dtype=np.float32)})
        with pytest.raises(errors.NotFound):
            m.restore({}, step=12345)
        with pytest.raises(errors.BudgetExhausted, match="budget"):
            m.save(2, {"big": np.zeros(BUDGET + 1, dtype=np.uint8)})
    with CheckpointManager(known_job, rank=0, world_size=1, addr=addr) as m:  # on_error="warn"
        h = m.save(1, {"w": np.zeros(16, dtype=np.float32)})
        assert not h.ok and isinstance(h.error, errors.AlreadyExists)
        with pytest.raises(errors.AlreadyExists):
            h.wait(Level.STAGED)
        h = m.save(3, {"big": np.zeros(BUDGET + 1, dtype=np.uint8)})
        assert h.skipped and isinstance(h.error, errors.BudgetExhausted)
        with pytest.raises(errors.BudgetExhausted):
            h.wait(Level.STAGED)
    with CheckpointManager(known_job, rank=1, world_size=2, addr=addr) as m:
        with pytest.raises(errors.FailedPrecondition, match="world_size"):
            m.restore({})
    with CheckpointManager(unique_job("typed"), rank=0, world_size=1, addr=addr) as m:
        with pytest.raises(errors.NotFound):
            m.conn.call(m.conn.stub.GetStepStatus, pb.GetStepStatusRequest(job=m.job, step=1))
        with pytest.raises(errors.InvalidArgument, match="step"):
            m.conn.call(m.conn.stub.GetStepStatus, pb.GetStepStatusRequest(job=m.job, step=-4))
        with pytest.raises(errors.InvalidArgument):
            m.conn.call(m.conn.stub.WaitStep, pb.WaitStepRequest(job=m.job, step=1, level=42))
    with pytest.raises(ValueError):
        CheckpointManager("../escape", rank=0, world_size=1, addr=addr)
    with pytest.raises(ValueError):
        CheckpointManager("ok", rank=2, world_size=2, addr=addr)


def test_client_without_a_daemon_is_daemon_unavailable(tmp_path: Any) -> None:
    with pytest.raises(errors.DaemonUnavailable):
        CheckpointManager("job", rank=0, world_size=1, addr=tmp_path / "nobody.sock", connect_timeout_s=0.5)


# -- still serving ---------------------------------------------------------------------------------------


def test_daemon_still_serves_after_all_of_it(mod_daemon: Daemon, stub: pb_grpc.CheckpointServiceStub) -> None:
    assert mod_daemon.alive()
    job = unique_job("after")
    state = {"w": np.arange(1000, dtype=np.float64), "meta": {"step": 7}}
    with CheckpointManager(job, rank=0, world_size=1, addr=mod_daemon.addr, on_error="raise") as m:
        m.save(7, state).wait(Level.LOCAL_DURABLE, timeout_s=60)
        out: dict[str, Any] = {}
        assert m.restore(out) == 7
    assert out["w"].tobytes() == state["w"].tobytes() and out["meta"] == {"step": 7}
    status = stub.DaemonStatus(pb.DaemonStatusRequest(), timeout=20)
    assert not status.draining
    assert mod_daemon.alive()
    log = mod_daemon.log()
    assert "internal error" not in log and "Traceback" not in log, log[-4000:]


def test_new_world_size_needs_the_opt_in_and_a_newer_step(stub: pb_grpc.CheckpointServiceStub) -> None:
    """A job saved by 1 rank: a save by 2 ranks is refused unless it opts in, and then only for a
    step newer than every step the job holds (a resumed job continues; its history is not rewritten)."""
    job = unique_job("newws")
    save_ok(stub, job, 5)
    expect(stub.BeginSave, pb.BeginSaveRequest(job=job, step=6, rank=0, world_size=2, nbytes=64),
           C.FAILED_PRECONDITION, "allow_new_world_size")
    expect(stub.BeginSave, pb.BeginSaveRequest(job=job, step=4, rank=0, world_size=2, nbytes=64, new_world_size=True),
           C.FAILED_PRECONDITION, "not newer than 5")
    lease = begin(stub, job, 6, world_size=2, new_world_size=True)
    write_slot(lease, b"\x04" * 64)
    assert stub.CommitShard(commit_req(lease, job, 6, world_size=2), timeout=20).level == pb.STAGED
