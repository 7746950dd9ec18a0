"""The PeerService rows of test_hostile_rpc.py's table, RPC by RPC.

Each row is one hostile request to one RPC of PeerService, sent with the valid peer token, and the
status it must get: PushReplica (stream shape, header consistency, chunk bytes and sums, names,
ranks, JSON fields, a shard no slot can hold), FetchShard, ListHoldings, ReportReady (including a
world-size mismatch with an earlier report of the same step: the two rows run in this order on one
daemon) and Ping (whose node id is ignored).
"""

from __future__ import annotations

from typing import Any

from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.integrity import chunk_crcs, crc32c
from ckptd.core.manifest import ReplicaHeader
from ckptd.core.types import MAX_STEP, MAX_WORLD_SIZE
from ckptd.peers.wire import header_to_pb
from tests.integration._hostile_kit import BIG, C, Case, Env, _entry


def _no_holdings(env: Env, out: list[bytes]) -> None:
    resp = ppb.ListHoldingsResponse.FromString(out[0])
    assert resp.node_id == "n1" and list(resp.holdings) == []


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

