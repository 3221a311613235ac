"""Who may call what: every call to a server running with TLS is checked here, before its
handler runs, against the caller's certificate.

gRPC's handshake has already proven that the caller holds a key certified by the consortium
CA. What it does not check is *which* member that is, whether that certificate was revoked
(the Python API offers no CRL hook), or whether it belongs to this consortium at all. An
:class:`AccessPolicy` does, in one place for every method of a server:

- the caller's identity is the ``spiffe://<consortium>/<role>[/<name>]`` URI in its
  certificate (:mod:`tapestry.pki.layout`); another consortium's, or none, is refused;
- a certificate whose serial number is in the CRL is refused; the CRL file is read again
  whenever it changes, so `tapestry certs revoke` takes effect without a restart;
- each method names the roles it admits; the rest admit any member of the consortium.

A refusal is PERMISSION_DENIED with one line saying what the method needs and who called.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import grpc
from cryptography import x509

from tapestry.errors import quoted
from tapestry.pki.credentials import CredentialError, certificate_sans, revoked_serials

log = logging.getLogger(__name__)

PeerRole = Literal["coordinator", "node", "operator"]
MEMBERS: frozenset[PeerRole] = frozenset({"coordinator", "node", "operator"})
# The auth-context property gRPC fills with the peer's certificate (PEM).
PEM_PROPERTY = "x509_pem_cert"


@dataclass(frozen=True)
class Peer:
    """A caller proven by its certificate: its consortium, role, name (empty for the
    coordinator) and the certificate's serial number."""

    consortium: str
    role: str
    name: str
    serial: int

    @property
    def uri(self) -> str:
        return f"spiffe://{self.consortium}/{self.role}" + (f"/{self.name}" if self.name else "")


@lru_cache(maxsize=256)
def _peer_of(pem: bytes) -> Peer | None:
    """The identity in a certificate, parsed once per certificate (a member's calls reuse
    the same one)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return peer_of_certificate(cert)


def peer_of_certificate(cert: x509.Certificate) -> Peer | None:
    """The identity ``cert`` names in its one ``spiffe://`` URI SAN, or None (none, several,
    or one that names no role of a member)."""
    uris = [san for san in certificate_sans(cert) if san.startswith("spiffe://")]
    if len(uris) != 1:
        return None
    consortium, _, path = uris[0].removeprefix("spiffe://").partition("/")
    role, _, name = path.partition("/")
    if role not in MEMBERS or "/" in name or (role == "coordinator") == bool(name):
        return None
    return Peer(consortium, role, name, cert.serial_number)


def calling_peer(context: grpc.ServicerContext) -> Peer | None:
    """The caller's identity from its certificate, or None (no TLS, or no usable identity)."""
    # At run time each property is a list of bytes; the stubs say ``Mapping[str, bytes]``.
    auth: Mapping[str, Sequence[bytes]] = cast(Any, context.auth_context())
    pems = auth.get(PEM_PROPERTY, [])
    return _peer_of(bytes(pems[0])) if len(pems) == 1 else None


class RevocationList:
    """The serials revoked by a CRL file, read again when the file changes. A CRL that can
    no longer be read or verified keeps the last good list and logs an error each time."""

    def __init__(self, crl: Path, ca: Path) -> None:
        self.crl = crl
        self.ca = ca
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self.serials()  # a bad CRL at start-up is refused (CredentialError), not kept

    def serials(self) -> frozenset[int]:
        try:
            info = os.stat(self.crl)
        except FileNotFoundError:
            if self._stamp is None:
                raise CredentialError(f"CRL {self.crl} does not exist") from None
            log.error("keeping the previous revocation list: CRL %s is gone", self.crl)
            return self._serials
        stamp = (info.st_mtime_ns, info.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._serials = revoked_serials(self.crl, self.ca)
                except CredentialError as problem:
                    if self._stamp is None:
                        raise
                    log.error("keeping the previous revocation list: %s", problem)
                self._stamp = stamp
            return self._serials


class AccessPolicy(grpc.ServerInterceptor):
    """Admit a call only from a member of ``consortium`` whose certificate is not revoked
    and whose role ``rules`` admits for the method (full path, ``/package.Service/Method``);
    a method not in ``rules`` admits every member."""

    def __init__(
        self,
        consortium: str,
        rules: Mapping[str, Collection[PeerRole]],
        revocations: RevocationList | None = None,
    ) -> None:
        self.consortium = consortium
        self.rules = {method: frozenset(roles) for method, roles in rules.items()}
        self.revocations = revocations

    def refusal(self, method: str, peer: Peer | None) -> str:
        """Why ``peer`` may not call ``method``; ``""`` when it may."""
        name = method.rpartition("/")[2]
        roles = self.rules.get(method, MEMBERS)
        needs = " or ".join(sorted(roles)) if roles != MEMBERS else "any member"
        wanted = f"{name} needs a certificate of consortium {self.consortium!r} ({needs})"
        if peer is None:
            return f"{wanted}; the caller's certificate names no consortium identity"
        if peer.consortium != self.consortium:
            return f"{wanted}; the caller is {quoted(peer.uri, 200)}"
        if self.revocations is not None and peer.serial in self.revocations.serials():
            return f"the caller's certificate {peer.uri} (serial {peer.serial:x}) is revoked"
        if peer.role not in roles:
            return f"{wanted}; the caller is {peer.uri}"
        return ""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def guard(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
            def checked(request: Any, context: grpc.ServicerContext) -> Any:
                why = self.refusal(method, calling_peer(context))
                if why:
                    log.warning("refused %s: %s", method, why)
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
                return behavior(request, context)

            return checked

        return wrapped_handler(handler, guard)


class PlaintextWarning(grpc.ServerInterceptor):
    """On a server started with ``--insecure``: log a warning on every call of ``methods``
    (a round, a cycle), so that nobody runs plaintext by accident for long."""

    def __init__(self, methods: Collection[str], what: str) -> None:
        self.methods = frozenset(methods)
        self.what = what

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler_call_details.method in self.methods:
            log.warning("INSECURE: %s over plaintext, from an unauthenticated caller", self.what)
        return continuation(handler_call_details)


def wrapped_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    guard: Callable[[Callable[[Any, grpc.ServicerContext], Any]], Any],
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behaviour run through ``guard``, whatever its streaming kind."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), **codecs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream), **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary), **codecs)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream), **codecs)
