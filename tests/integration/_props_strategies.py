"""Hypothesis strategies and settings of the property tests of test_rpc_properties.py.

The strategies draw request fields mixing values that hit the daemon's real state (the small pool
of job names ``POOL``, small steps and ranks, real leases) with adversarial ones (arbitrary text,
int64/uint64 boundaries, NaN and infinities, unknown enum values, mutated layouts, random and
mutated bytes). ``save_then_commit`` is a real BeginSave then a CommitShard that keeps or breaks
it, ``replica_pushes`` a consistent replica header and chunks with maybe one thing broken,
``mutated`` random bytes or a valid message with bytes flipped, cut or inserted, for any RPC.
``EXAMPLES`` and ``FEW`` are the per-test example counts that keep the module near 35 s on two
cores.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import peer_service_pb2 as ppb
from ckptd.core.integrity import chunk_crcs, crc32c
from ckptd.core.layout import TensorEntry
from ckptd.core.manifest import ReplicaHeader, ShardEntry
from ckptd.core.types import DTYPE_ITEMSIZE, MAX_STEP
from ckptd.peers.wire import header_to_pb
from tests.integration._hostile_kit import CKPT_RPCS, PEER_RPCS, _layout
from tests.integration._props_kit import BUDGET, KEEP, POOL

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
