"""Domain errors -> gRPC status codes, in one place for every servicer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import grpc
from grpc_health.v1 import health

from tapestry.errors import Busy, NotFound, UserError, WireError
from tapestry.limits import MAX_ERROR_DETAILS_CHARS

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


@dataclass(frozen=True)
class Peer:
    """What a caller expected to find at an address, so a failed call can say what is
    wrong and what to do: a human ``role``, one ``method`` of the expected service (its
    full name is read from the generated descriptors, so a renamed service needs no change
    here) or the ``service`` name itself, and the command that starts one (``start``)."""

    role: str
    method: str = ""
    service: str = ""
    start: str = ""
    # Where a wrong address is fixed, when no command-line option sets it.
    fix: str = "fix the address"

    @property
    def service_name(self) -> str:
        if self.service or not self.method:
            return self.service
        from tapestry.consortium.v1 import consortium_pb2 as pb  # light: protobuf only

        for service in pb.DESCRIPTOR.services_by_name.values():
            if self.method in service.methods_by_name:
                return str(service.full_name)
        return ""


COORDINATOR = Peer(
    "coordinator",
    method="RunRound",
    start="tapestry coordinator serve --config FILE --data-dir DIR",
)
# A node is another institution's server: its operator starts it, the coordinator's cannot.
NODE = Peer(
    "sovereign node", method="RunSovereignCycle", fix="fix its address in the consortium file"
)
SERVER = Peer("Tapestry server", service=health.SERVICE_NAME)  # any of ours: all serve health


def describe_rpc_error(
    error: grpc.RpcError, address: str = "", expected: Peer | None = None, option: str = ""
) -> str:
    """A failed call in words a person can act on; the one way RPC errors are shown.

    ``address`` is where the call went, ``expected`` what should have answered there and
    ``option`` the flag that sets the address (for the hint). Without them the result is
    ``CODE: details``. The status code's name is always in the text, so scripts and logs
    can still match on it.
    """
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    details = str(details or "")
    if len(details) > MAX_ERROR_DETAILS_CHARS:
        details = f"{details[:MAX_ERROR_DETAILS_CHARS]}… ({len(details)} characters)"
    status = f"{code.name if code else 'UNKNOWN'}: {details}"
    if expected is None or not address:
        return f"{address}: {status}" if address else status
    role = expected.role
    if code is grpc.StatusCode.UNAVAILABLE and (problem := _tls_problem(details)):
        return f"no TLS connection to the {role} at {address}: {problem} ({status})"
    if code is grpc.StatusCode.UNAVAILABLE and (reason := _no_connection(details)):
        start = f" Start one with `{expected.start} --listen {address}`" if expected.start else ""
        where = f"pass {option} HOST:PORT" if option else expected.fix
        return f"no {role} answers at {address} ({code.name}: {reason}) — is it running?" + (
            f"{start}, or {where}." if start else f" Otherwise {where}."
        )
    if code is grpc.StatusCode.UNIMPLEMENTED:
        service = expected.service_name or f"the {role} service"
        where = f"pass the {role}'s address with {option} HOST:PORT" if option else expected.fix
        return (
            f"{address} is not a Tapestry {role}: it does not serve {service} ({status}). "
            f"Is this the right address? If not, {where}."
        )
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"the {role} at {address} went away during the call ({status})"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the {role} at {address} did not answer in time ({status})"
    return f"the {role} at {address} refused the call ({status})"


# What gRPC's connection errors say when TLS fails, and what that means for the caller.
_TLS_PROBLEMS = (
    (
        "WRONG_VERSION_NUMBER",
        "the server speaks plaintext (it was started with --insecure); call it with --insecure",
    ),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "a certificate is not from the expected CA: the server's is not signed by the CA you "
        "trust (--ca), or yours is not signed by the server's",
    ),
    (
        "Hostname Verification Check failed",
        "the server's certificate does not name the server expected there (for a node: its "
        "node id), so it is not that server",
    ),
    (
        "Socket closed",
        "the server closed the connection during the handshake: it serves mutual TLS and "
        "wants a certificate from its consortium (--ca, --cert, --key), or refused yours",
    ),
)


def _tls_problem(details: str) -> str:
    """What went wrong when a connection failed in its TLS handshake, or ``""``."""
    if not details.startswith("failed to connect to all addresses"):
        return ""
    return next((meaning for marker, meaning in _TLS_PROBLEMS if marker in details), "")


def _no_connection(details: str) -> str:
    """The cause of a failure to connect at all (refused, unknown host...), or ``""``."""
    if details.startswith(("failed to connect to all addresses", "DNS resolution failed")):
        cause = details.rsplit(": ", 1)[-1].strip()
        return cause[:1].lower() + cause[1:]
    return ""
