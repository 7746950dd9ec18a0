"""The CheckpointService servicer: validate the transport-level shape, call a service, convert.

``CheckpointServicer`` is handed the services it adapts (the save path, the restore service, the
step queries, the step admin, the peer membership or None) and ``status()``, the daemon's status
report; it holds no state of its own. Every handler goes through ``_rpc``, the single place that
maps errors: a ``CkptdError`` becomes its table's status code plus ``ckptd-error`` trailing
metadata (the client rebuilds the type); anything unexpected is logged and returned as INTERNAL
without a traceback. ``add_checkpoint_servicer`` registers it with lenient request parsing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from ckptd.core.errors import FailedPrecondition, InvalidArgument, lenient, rpc_handler
from ckptd.core.layout_memo import LayoutMemo
from ckptd.drains.admin import StepAdmin
from ckptd.peers.membership import Membership
from ckptd.restore.queries import StepQueries
from ckptd.restore.service import RestoreService
from ckptd.restore.sources.base import ReadScope
from ckptd.rpc.convert import level_from_pb, step_status_to_pb, tier_statuses
from ckptd.save.prepare import prepare_save
from ckptd.save.service import SavePath

log = logging.getLogger("ckptd.server")
SERVICE_NAME = "ckptd.v1.CheckpointService"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024



_rpc = rpc_handler


def _step_arg(step: int) -> int | None:
    if step == -1:
        return None
    if step < 0:
        raise InvalidArgument(f"step {step} is negative (use -1 for latest)")
    return step


def _scope(request: pb.PrepareRestoreRequest, client_verifies: bool = False) -> ReadScope:
    """What of the shard a restore reads: a ranged restore's byte ranges (offset, length), checked
    against the shard by the source; whether the client checks the chunks (streamed restores)."""
    return ReadScope(tuple((int(r.offset), int(r.length)) for r in request.ranges), client_verifies)


def _below_arg(step: int) -> int | None:
    if step < 0:
        raise InvalidArgument(f"below_step {step} is negative (0: no bound)")
    return step or None


class CheckpointServicer(pb_grpc.CheckpointServiceServicer):
    def __init__(self, saves: SavePath, restores: RestoreService, steps: StepQueries, admin: StepAdmin,
                 membership: Membership | None, status: Callable[[], dict[str, Any]], chunk_bytes: int,
                 layouts: LayoutMemo | None = None) -> None:
        self.saves = saves
        self.layouts = layouts if layouts is not None else LayoutMemo()  # layouts converted once
        self.restores = restores
        self.steps = steps
        self.admin = admin
        self.membership = membership
        self.status = status
        self.chunk_bytes = chunk_bytes

    @_rpc
    async def BeginSave(self, request: pb.BeginSaveRequest, context: Any) -> pb.BeginSaveResponse:
        wait = {pb.BACKPRESSURE_WAIT: True, pb.BACKPRESSURE_SKIP: False}.get(request.policy)
        if request.policy not in (pb.BACKPRESSURE_DEFAULT, pb.BACKPRESSURE_WAIT, pb.BACKPRESSURE_SKIP):
            raise InvalidArgument(f"unknown back-pressure policy {request.policy}")
        timeout_s = request.wait_timeout_ms / 1000 if request.wait_timeout_ms else None
        lease = await self.saves.begin_save(request.job, request.step, request.rank, request.world_size,
                                        request.nbytes, wait, timeout_s, request.client_pid,
                                        tuple(request.node_ranks), request.incarnation,
                                        request.resumed_from if request.resumed else None,
                                        new_world_size=request.new_world_size)
        return pb.BeginSaveResponse(
            lease_id=lease.lease_id, slot_path=str(lease.slot.path),
            slot_capacity_bytes=lease.slot.capacity, chunk_bytes=self.chunk_bytes,
        )

    @_rpc
    async def PrepareSave(self, request: pb.PrepareSaveRequest, context: Any) -> pb.PrepareSaveResponse:
        slots, wanted = await prepare_save(self.saves, request.job, request.rank, request.world_size,
                                           request.nbytes, request.slots)
        return pb.PrepareSaveResponse(slots_wanted=wanted, slots=[pb.RestoreSlot(
            job=request.job, rank=request.rank, slot_path=str(s.path), capacity_bytes=s.capacity) for s in slots])

    @_rpc
    async def CommitShard(self, request: pb.CommitShardRequest, context: Any) -> pb.CommitShardResponse:
        level = await self.saves.commit_shard(
            request.lease_id, request.job, request.step, request.rank, request.world_size,
            request.nbytes, self.layouts.decode(request.layout), request.layout.tree_json,
            request.chunk_bytes, list(request.chunk_crc32c), request.client_stall_s,
        )
        return pb.CommitShardResponse(level=int(level))  # type: ignore[arg-type]

    @_rpc
    async def AbortSave(self, request: pb.AbortSaveRequest, context: Any) -> pb.AbortSaveResponse:
        await self.saves.abort_save(request.lease_id)
        return pb.AbortSaveResponse()

    @_rpc
    async def GetStepStatus(self, request: pb.GetStepStatusRequest, context: Any) -> pb.StepStatus:
        return step_status_to_pb(self.steps.step_status(request.job, request.step))

    @_rpc
    async def WaitStep(self, request: pb.WaitStepRequest, context: Any) -> pb.StepStatus:
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else 3600.0
        st = await self.steps.wait_step(request.job, request.step, level_from_pb(request.level), timeout_s)
        return step_status_to_pb(st)

    @_rpc
    async def ListSteps(self, request: pb.ListStepsRequest, context: Any) -> pb.ListStepsResponse:
        steps = self.steps.list_steps(request.job)
        pins = self.admin.pins.get(request.job)
        return pb.ListStepsResponse(job=request.job, steps=[
            pb.StepInfo(step=s.step, world_size=s.world_size, nbytes=s.nbytes,
                        tiers=tier_statuses(s), committed=s.held,
                        pinned=s.step in pins)
            for s in steps
        ])

    @_rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=self.steps.list_jobs())

    @_rpc
    async def PrepareRestore(self, request: pb.PrepareRestoreRequest, context: Any) -> pb.PrepareRestoreResponse:
        result, lease_id = await self.restores.prepare_restore(
            request.job, request.rank, request.world_size, _step_arg(request.step), request.dry_run,
            request.client_pid, request.strict_latest, _below_arg(request.below_step), request.retire_incarnation,
            _scope(request))
        resp = pb.PrepareRestoreResponse(
            step=result.step,
            plan=[pb.PlannedSource(tier=s.tier.value, detail=s.detail) for s in result.plan],
            rejected=result.rejected, read_s=result.read_s, unusable_steps=result.unusable,
        )
        if result.entry is not None and result.slot is not None:
            resp.lease_id = lease_id
            resp.slot_path = str(result.slot.path)
            resp.nbytes = result.entry.nbytes
            resp.layout.CopyFrom(self.layouts.encode(result.entry.tensors, self.layouts.tree_json(result.entry.tree)))
            resp.served_from = result.served_from.value if result.served_from else ""
        return resp

    @_rpc
    async def Restore(self, request: pb.PrepareRestoreRequest, context: Any) -> None:  # type: ignore[override]
        """PrepareRestore with progress: see RestoreEvent in the proto and ckptd/restore/stream.py."""
        if request.dry_run:
            raise InvalidArgument("Restore streams a real restore; plan with PrepareRestore(dry_run=true)")
        async for ev, result, lease_id in self.restores.restore_stream(
                request.job, request.rank, request.world_size, _step_arg(request.step), request.client_pid,
                request.strict_latest, _below_arg(request.below_step), request.retire_incarnation,
                _scope(request, request.client_verifies)):
            if ev.kind == "ready":
                await context.write(pb.RestoreEvent(ready_bytes=ev.ready_bytes))
            elif ev.kind == "restart":
                await context.write(pb.RestoreEvent(restart=ev.reason))
            elif ev.kind == "start":
                assert ev.slot is not None and ev.entry is not None and ev.tier is not None
                start = pb.PrepareRestoreResponse(
                    step=result.step, slot_path=str(ev.slot.path), nbytes=ev.entry.nbytes, served_from=ev.tier.value,
                    plan=[pb.PlannedSource(tier=s.tier.value, detail=s.detail) for s in result.plan])
                start.layout.CopyFrom(self.layouts.encode(ev.entry.tensors, self.layouts.tree_json(ev.entry.tree)))
                if ev.client_verifies:
                    start.client_verifies = True
                    start.chunk_bytes = ev.entry.chunk_bytes
                    start.chunk_crc32c.extend(ev.entry.chunk_crc32c)
                await context.write(pb.RestoreEvent(start=start))
            else:  # done
                await context.write(pb.RestoreEvent(done=pb.PrepareRestoreResponse(
                    lease_id=lease_id, step=result.step, rejected=result.rejected, read_s=result.read_s,
                    served_from=result.served_from.value if result.served_from else "",
                    unusable_steps=result.unusable)))

    @_rpc
    async def SetPeers(self, request: pb.SetPeersRequest, context: Any) -> pb.SetPeersResponse:
        if len(request.peers) > 100_000:
            raise InvalidArgument(f"SetPeers: {len(request.peers)} entries (at most 100000)")
        if self.membership is None:
            raise FailedPrecondition("peer replication is off on this daemon (set peers.listen and a token)")
        return pb.SetPeersResponse(members=self.membership.set_peers(list(request.peers)))

    @_rpc
    async def ReleaseRestore(self, request: pb.ReleaseRestoreRequest, context: Any) -> pb.ReleaseRestoreResponse:
        await self.restores.release_restore(request.lease_id)
        return pb.ReleaseRestoreResponse()

    @_rpc
    async def GetManifest(self, request: pb.GetManifestRequest, context: Any) -> pb.GetManifestResponse:
        manifest, tiers = await self.steps.get_manifest(request.job, _step_arg(request.step))
        return pb.GetManifestResponse(manifest_json=manifest.to_json().decode(), tiers=tiers)

    @_rpc
    async def DaemonStatus(self, request: pb.DaemonStatusRequest, context: Any) -> pb.DaemonStatusResponse:
        return pb.DaemonStatusResponse(**self.status())

    @_rpc
    async def DeleteStep(self, request: pb.DeleteStepRequest, context: Any) -> pb.DeleteStepResponse:
        result = await self.admin.delete_step(request.job, request.step, request.tier, request.force, request.dry_run)
        return pb.DeleteStepResponse(deleted=[pb.DeletedCopy(job=r.job, step=r.step, tier=r.tier)
                                              for r in result.deleted], refused=result.refused)

    @_rpc
    async def PinStep(self, request: pb.PinStepRequest, context: Any) -> pb.PinStepResponse:
        return pb.PinStepResponse(pinned_steps=await self.admin.pin_step(request.job, request.step, request.pinned))

    @_rpc
    async def RunRetention(self, request: pb.RunRetentionRequest, context: Any) -> pb.RunRetentionResponse:
        result = await self.admin.run_retention(request.job, request.tier, request.dry_run)
        return pb.RunRetentionResponse(
            deleted=[pb.DeletedCopy(job=r.job, step=r.step, tier=r.tier) for r in result.deleted],
            errors=result.refused,
            policies=[pb.RetentionPolicy(tier=t, max_to_keep=n, keep_period=p) for t, n, p in result.policies])


def add_checkpoint_servicer(servicer: CheckpointServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated ``add_CheckpointServiceServicer_to_server``, but with
    lenient request deserializers: bytes that do not parse are answered INVALID_ARGUMENT by the
    handler (ckptd/core/errors.py), not UNKNOWN with a traceback by grpc."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in pb.DESCRIPTOR.services_by_name["CheckpointService"].methods:
        req, resp = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name), request_deserializer=lenient(req.FromString, method.input_type.name),
            response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
