"""The CheckpointService rows of test_hostile_rpc.py's table, RPC by RPC.

Each row is one hostile request to one RPC of CheckpointService and the status it must get:
BeginSave (ranks, node ranks, sizes, world-size mismatches, job names), CommitShard
(dtype/shape/offset/size combinations, layouts, leases), AbortSave, GetStepStatus, WaitStep,
ListSteps, ListJobs, PrepareRestore (world-size mismatch, ranks, steps), ReleaseRestore,
GetManifest, DaemonStatus, DeleteStep, PinStep, RunRetention and PrepareSave. Requests that need the daemon's
state (a committed job, a live or used lease) are built from the module's ``Env`` when the case
runs; the ``check`` of an accepted request looks at the response (and the disk) to make sure
nothing was done that should not be (the latest step not deleted, no pin file for an unknown job).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd.core.types import MAX_STEP, MAX_WORLD_SIZE
from tests._ckptd_helpers import unique_job
from tests.integration._hostile_kit import BIG, C, Case, Env, _layout, _Stub


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
        # PrepareSave (nothing is made for a refused request)
        Case("PrepareSave", "job-traversal", pb.PrepareSaveRequest(job="../x", world_size=1, nbytes=8),
             C.INVALID_ARGUMENT, "job name"),
        Case("PrepareSave", "world-size-zero", pb.PrepareSaveRequest(job="j", nbytes=8), C.INVALID_ARGUMENT, "world"),
        Case("PrepareSave", "rank-out-of-range", pb.PrepareSaveRequest(job="j", rank=2, world_size=2, nbytes=8),
             C.INVALID_ARGUMENT, "rank"),
        Case("PrepareSave", "rank-negative", pb.PrepareSaveRequest(job="j", rank=-1, world_size=2, nbytes=8),
             C.INVALID_ARGUMENT, "rank"),
        Case("PrepareSave", "nbytes-over-max-shard", pb.PrepareSaveRequest(job="j", world_size=1, nbytes=2**62),
             C.INVALID_ARGUMENT, "max_shard_bytes"),
        Case("PrepareSave", "slots-over-slots-per-rank", pb.PrepareSaveRequest(job="j", world_size=1, nbytes=8,
                                                                                slots=4), C.INVALID_ARGUMENT,
             "slots_per_rank"),
        Case("PrepareSave", "shard-over-budget", pb.PrepareSaveRequest(job="j", world_size=1, nbytes=2**30),
             C.RESOURCE_EXHAUSTED, "budget"),
    ] + [Case("CommitShard", f"tensor-meta-{i}", _commit([t]), C.INVALID_ARGUMENT, frag) for i, (t, frag) in enumerate([
        (TO(name="w", dtype="complex256", shape=[4], offset=0, nbytes=64), "dtype"),
        (TO(name="w", dtype="float32", shape=[4, 4, -1], offset=0, nbytes=64), "negative"),
        (TO(name="w", dtype="int64", shape=[1] * 33, offset=0, nbytes=8), "dims"),
    ])]

