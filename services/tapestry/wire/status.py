"""Domain errors -> gRPC status codes, in one place for every servicer."""

from __future__ import annotations

from typing import NoReturn

import grpc

from tapestry.errors import Busy, NotFound, UserError, WireError

# Most specific first: WireError and many UserErrors are ValueErrors too.
_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (WireError, grpc.StatusCode.INVALID_ARGUMENT),
    (UserError, grpc.StatusCode.FAILED_PRECONDITION),
    (Busy, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
]


def status_for(error: BaseException) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the status ``error`` maps to and its message."""
    context.abort(status_for(error), f"{type(error).__name__}: {error}")
    raise AssertionError("context.abort returned")  # pragma: no cover


def describe_rpc_error(error: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, the one way RPC errors are shown to people."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code else 'UNKNOWN'}: {details}"
