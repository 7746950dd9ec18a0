"""The one error table of ckptd: typed errors, their gRPC status codes and CLI exit codes, and the
one place that turns a servicer's exception into a gRPC status (daemon and peer services).

Servicers raise these; ``rpc_handler`` turns a ``CkptdError`` into its table code plus a
``ckptd-error`` trailing metadata entry naming the class, and the client rebuilds the same class
with ``from_rpc_error``; anything else is logged and answered INTERNAL without a traceback (and
rebuilt as ``CkptdError``). Only request checks answer INVALID_ARGUMENT: ``InvalidArgument``, and
``InvalidValue`` from the name and number validators. A bare ValueError reaching here is the
daemon's own fault (a closed mapping, a bad record), never the caller's bad input: it is INTERNAL
(before, every ValueError was answered INVALID_ARGUMENT, so a slot's mapping closed under a
restore reached the client as ``InvalidArgument: mmap closed or invalid``).

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
from typing import Any, ClassVar, Final, TypeVar

import grpc

ERROR_METADATA_KEY: Final = "ckptd-error"


class CkptdError(Exception):
    """Base of every ckptd error."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    exit_code: ClassVar[int] = 1


class InvalidArgument(CkptdError, ValueError):
    """A request, config value or flag is malformed or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 2


class InvalidValue(ValueError):
    """A name or number outside its grammar (the validators of core/types.py): the caller's bad
    input, answered INVALID_ARGUMENT like InvalidArgument. Not a CkptdError on purpose: code that
    takes a CkptdError for a missing or damaged copy (a restore source's survey) lets it through."""


class NotFound(CkptdError, LookupError):
    """The job, step, lease or shard does not exist (or is not committed anywhere)."""

    code = grpc.StatusCode.NOT_FOUND
    exit_code = 4


class AlreadyExists(CkptdError):
    """The step/rank was already committed or is being saved by another writer."""

    code = grpc.StatusCode.ALREADY_EXISTS
    exit_code = 1


class BudgetExhausted(CkptdError):
    """No slot fits in the byte budget (back-pressure): the save waited and gave up, or skipped."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 1


class IntegrityError(CkptdError):
    """A checksum or size did not match: the copy is invalid."""

    code = grpc.StatusCode.DATA_LOSS
    exit_code = 5


class TierFailed(CkptdError):
    """A tier failed to store or serve data (I/O error, no space, store down)."""

    code = grpc.StatusCode.UNAVAILABLE
    exit_code = 1


class DaemonUnavailable(CkptdError):
    """The daemon cannot be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE
    exit_code = 6


class Timeout(CkptdError, TimeoutError):
    """A wait ran past its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    exit_code = 7


class FailedPrecondition(CkptdError):
    """The request is valid but the state does not allow it (e.g. world size mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = 1


class PermissionDenied(CkptdError):
    """The caller is not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    exit_code = 1


class Unauthenticated(CkptdError):
    """A peer call without a valid peer token (or a token this node's peers refused)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    exit_code = 1


ERRORS: Final[dict[str, type[CkptdError]]] = {
    cls.__name__: cls
    for cls in (
        CkptdError,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        BudgetExhausted,
        IntegrityError,
        TierFailed,
        DaemonUnavailable,
        Timeout,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
    )
}

_CODE_FALLBACK: Final[dict[grpc.StatusCode, type[CkptdError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BudgetExhausted,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.UNAVAILABLE: DaemonUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Timeout,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(err: grpc.RpcError) -> CkptdError:
    """Rebuild the typed error a servicer raised from a client-side RpcError."""
    name = ""
    details = ""
    code = grpc.StatusCode.UNKNOWN
    if isinstance(err, grpc.Call):
        code = err.code()
        details = err.details() or ""
        for key, value in err.trailing_metadata() or ():
            if key == ERROR_METADATA_KEY:
                name = value if isinstance(value, str) else value.decode()
    cls = ERRORS.get(name)
    if cls is None:
        cls = _CODE_FALLBACK.get(code, CkptdError)
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"daemon unavailable: {details}"
    return cls(details or code.name)


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
        except InvalidValue as exc:
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
