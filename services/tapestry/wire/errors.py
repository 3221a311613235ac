"""Domain errors -> gRPC status codes, in one place for every servicer."""

from __future__ import annotations

from typing import NoReturn

import grpc

from tapestry.config import ConfigError
from tapestry.wire.tensor_stream import WireError


class Busy(RuntimeError):
    """The service is already doing the one thing it does at a time."""


class NotFound(LookupError):
    """The thing asked for does not exist (yet)."""


# Most specific first: WireError and ConfigError are ValueErrors too.
_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (WireError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
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
