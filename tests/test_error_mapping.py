"""``rpc_handler`` over real gRPC: the caller's bad input is INVALID_ARGUMENT, a daemon fault never is.

Before, any ValueError a handler let escape was answered INVALID_ARGUMENT, so a slot's mapping
closed under a restore reached the client as ``InvalidArgument: mmap closed or invalid``, blaming
its request. Request checks raise InvalidArgument themselves; anything else is INTERNAL.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from ckptd.core.errors import CkptdError, InvalidArgument, from_rpc_error, rpc_handler


def closed_mapping_read() -> bytes:
    mm = mmap.mmap(-1, 4096)
    mm.close()
    return bytes(memoryview(mm))  # ValueError: mmap closed or invalid


def bad_request() -> bytes:
    raise InvalidArgument("step -2 is negative")


@pytest.mark.parametrize(("body", "code", "cls"), [
    (closed_mapping_read, grpc.StatusCode.INTERNAL, CkptdError),
    (bad_request, grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
])
def test_only_request_checks_answer_invalid_argument(tmp_path: Path, body: Callable[[], bytes],
                                                     code: grpc.StatusCode, cls: type[CkptdError]) -> None:
    class Servicer:
        @rpc_handler
        async def call(self, request: bytes, context: Any) -> bytes:
            return body()

    async def run() -> CkptdError:
        servicer = Servicer()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Errors", {"Call": grpc.unary_unary_rpc_method_handler(servicer.call)}),))
        addr = f"unix://{tmp_path / 'errors.sock'}"
        server.add_insecure_port(addr)
        await server.start()
        try:
            return await asyncio.to_thread(call, addr)
        finally:
            await server.stop(None)

    def call(addr: str) -> CkptdError:  # the client's side: a blocking channel, as ckptd_client's
        with grpc.insecure_channel(addr) as channel:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/test.Errors/Call")(b"", timeout=10)
        assert isinstance(info.value, grpc.Call) and info.value.code() == code
        return from_rpc_error(info.value)

    err = asyncio.run(run())
    assert type(err) is cls
