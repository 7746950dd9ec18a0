"""The one place that turns a servicer's exception into a gRPC status (daemon and peer services).

A ``CkptdError`` becomes its table code (ckptd/core/errors.py) plus ``ckptd-error`` trailing metadata
naming the class, which the client rebuilds; a ValueError is an InvalidArgument; anything else is
logged and answered INTERNAL without a traceback.

Request bytes that do not parse never reach a handler as an exception inside grpc (which would answer
UNKNOWN and log a traceback): the services register ``lenient`` deserializers, which turn a parse
failure into a ``MalformedRequest`` value, and ``rpc_handler`` answers it INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ckptd.core.errors import ERROR_METADATA_KEY, CkptdError, InvalidArgument

log = logging.getLogger("ckptd.rpc")

R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True)
class MalformedRequest:
    """Stands for request bytes that did not parse as ``what``; its handler answers INVALID_ARGUMENT."""

    what: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"malformed {self.what} message: {self.reason}")


def lenient(parse: Callable[[bytes], T], what: str) -> Callable[[bytes], T | MalformedRequest]:
    """A request deserializer that never raises: bytes ``parse`` refuses become a MalformedRequest."""

    def deserialize(data: bytes) -> T | MalformedRequest:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the message is malformed
            return MalformedRequest(what, f"{type(exc).__name__}: {exc}"[:500])

    return deserialize


def rpc_handler(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            return await fn(self, request, context)
        except CkptdError as exc:
            err: CkptdError = exc
        except ValueError as exc:
            err = InvalidArgument(str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("internal error in %s", fn.__name__)
            err = CkptdError(f"internal error: {type(exc).__name__}: {exc}")
        context.set_trailing_metadata(((ERROR_METADATA_KEY, type(err).__name__),))
        await context.abort(err.code, str(err))
        raise AssertionError("unreachable")
    return wrapper
