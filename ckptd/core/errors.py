"""The one error table of ckptd: typed errors, their gRPC status codes and CLI exit codes.

Servicers raise these; ``server.py`` turns them into a gRPC status plus a ``ckptd-error``
trailing metadata entry naming the class; the client rebuilds the same class with
``from_rpc_error``. Anything not in the table becomes ``CkptdError`` (INTERNAL).
"""

from __future__ import annotations

from typing import ClassVar, Final

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
