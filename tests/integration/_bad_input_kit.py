"""Raw-stub helpers of test_bad_input.py: expect a typed refusal, and do a correct save by hand.

``expect`` makes one call through the generated CheckpointService stub (no client-side validation
in the way) and asserts it fails with the exact status code, a message holding the given
fragments, and the ``ckptd-error`` trailing metadata naming an error class of ckptd.core.errors whose
code is that status. ``begin``, ``commit_req``, ``write_slot`` and ``save_ok`` lease a slot,
write it and commit it the way the client does, so a test can break exactly one field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from ckptd._proto.ckptd.v1 import checkpoint_service_pb2 as pb
from ckptd._proto.ckptd.v1 import checkpoint_service_pb2_grpc as pb_grpc
from ckptd.core import errors
from ckptd.core.errors import ERROR_METADATA_KEY


@dataclass
class Failure:
    code: grpc.StatusCode
    details: str
    error_class: str | None


def fail(method: Callable[..., Any], request: Any) -> Failure:
    """Call and expect an RpcError; return its code, details and the ckptd-error metadata."""
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=20)
    err = info.value
    assert isinstance(err, grpc.Call)
    name = None
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_METADATA_KEY:
            name = value if isinstance(value, str) else value.decode()
    return Failure(err.code(), err.details() or "", name)


def expect(method: Callable[..., Any], request: Any, code: grpc.StatusCode, *fragments: str) -> Failure:
    f = fail(method, request)
    assert f.code == code, f
    assert f.details, f
    for fragment in fragments:
        assert fragment in f.details, f
    assert f.error_class is not None and f.error_class in errors.ERRORS, f
    assert errors.ERRORS[f.error_class].code == code, f  # the metadata names the class of that code
    return f


def begin(stub: pb_grpc.CheckpointServiceStub, job: str, step: int = 1, rank: int = 0, world_size: int = 1,
          nbytes: int = 64, **kw: Any) -> pb.BeginSaveResponse:
    resp: pb.BeginSaveResponse = stub.BeginSave(pb.BeginSaveRequest(
        job=job, step=step, rank=rank, world_size=world_size, nbytes=nbytes, client_pid=os.getpid(), **kw),
        timeout=20)
    return resp


def simple_layout(nbytes: int = 64) -> pb.ShardLayout:
    return pb.ShardLayout(
        tensors=[pb.TensorMeta(name="w", dtype="float32", shape=[nbytes // 4], offset=0, nbytes=nbytes)],
        tree_json=json.dumps({"d": [["w", {"t": 0}]]}),
    )


def commit_req(lease: pb.BeginSaveResponse, job: str, step: int = 1, rank: int = 0, world_size: int = 1,
               nbytes: int = 64, layout: pb.ShardLayout | None = None, **kw: Any) -> pb.CommitShardRequest:
    return pb.CommitShardRequest(lease_id=lease.lease_id, job=job, step=step, rank=rank, world_size=world_size,
                                 nbytes=nbytes, layout=layout if layout is not None else simple_layout(nbytes),
                                 **kw)


def write_slot(lease: pb.BeginSaveResponse, data: bytes) -> None:
    fd = os.open(lease.slot_path, os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def save_ok(stub: pb_grpc.CheckpointServiceStub, job: str, step: int, data: bytes = b"\x01" * 64) -> None:
    """A correct raw save of one rank, waited to LOCAL_DURABLE."""
    lease = begin(stub, job, step, nbytes=len(data))
    write_slot(lease, data)
    stub.CommitShard(commit_req(lease, job, step, nbytes=len(data), layout=simple_layout(len(data))), timeout=20)
    st = stub.WaitStep(pb.WaitStepRequest(job=job, step=step, level=pb.LOCAL_DURABLE, timeout_ms=60_000),
                       timeout=70)
    assert st.level == pb.LOCAL_DURABLE
