"""What the coordinator's gRPC handshake with a node cannot check: that the certificate the
server presents has not been revoked.

gRPC checks the chain and the node's name, but its Python API applies no CRL on the client
side and does not show the client the server's certificate. So a server holding a node's
*revoked* certificate and key (a decommissioned machine, a stolen key that was revoked)
would pass the handshake and be sent the base. Before a node is sent any weights, the
coordinator therefore opens one more TLS connection to the node's address with the same
certificates and names (:class:`ServerCertificateCheck`), reads the certificate served
there, and refuses it when the CRL lists it. It fails closed: a server that cannot be
checked gets no weights either.

The check is a connection of its own, not the channel's: it refuses a server that presents
a revoked certificate, but an attacker in the network path who relays this connection to
the real node and answers the channel's itself would not be seen by it.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509

from tapestry.config import TlsConfig
from tapestry.errors import UserError
from tapestry.pki.access import RevocationList
from tapestry.pki.credentials import certificate_sans
from tapestry.pki.layout import NODE_NAME_SUFFIX


class ServerNotTrusted(UserError):
    """The server at an address presents a revoked certificate, or could not be checked."""


class ServerCertificateCheck:
    """Check the certificate served at an address against the CA, the expected name and
    the CRL (read again when it changes), presenting our own certificate as gRPC does."""

    def __init__(self, tls: TlsConfig, revocations: RevocationList) -> None:
        self.revocations = revocations
        self._context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
        self._context.load_cert_chain(tls.cert, tls.key)
        self._context.set_alpn_protocols(["h2"])  # what a gRPC client offers

    def served_certificate(self, address: str, server_name: str, timeout_s: float) -> bytes:
        """The DER certificate served at ``address``, verified for ``server_name``."""
        try:
            der = _served_der(self._context, address, server_name, timeout_s)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise ServerNotTrusted(
                f"the server at {address} could not be checked for a revoked certificate: {error}"
            ) from None
        if der is None:  # pragma: no cover - a verified handshake always has one
            raise ServerNotTrusted(f"the server at {address} presented no certificate")
        return der

    def check(self, address: str, server_name: str, timeout_s: float) -> None:
        """Refuse (:class:`ServerNotTrusted`) the server at ``address`` unless it presents a
        certificate for ``server_name`` from our CA that the CRL does not list."""
        certificate = x509.load_der_x509_certificate(
            self.served_certificate(address, server_name, timeout_s)
        )
        serial = certificate.serial_number
        if serial in self.revocations.serials():
            raise ServerNotTrusted(
                f"the server at {address} presents a revoked certificate for {server_name} "
                f"(serial {serial:x} is in {Path(self.revocations.crl)}): it is not that "
                "member, or the member must be issued a new certificate"
            )


def served_node_id(tls: TlsConfig, address: str, timeout_s: float) -> str | None:
    """The node id that the certificate served at ``address`` names (its
    ``NODE_ID.node.tapestry.invalid`` DNS name), read over a TLS connection that presents
    our certificate and checks the chain against our CA but not the name; ``None`` when
    none can be read. It explains a handshake refused for the name (a member listed under
    another node's id); it never admits anyone: gRPC's handshake still checks the name."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.check_hostname = False  # the name is what we want to read, not to check
    context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2"])
    try:
        der = _served_der(context, address, None, timeout_s)
    except (OSError, ValueError):
        return None
    if der is None:  # pragma: no cover - a verified handshake always has one
        return None
    names = certificate_sans(x509.load_der_x509_certificate(der))
    ids = [name.removesuffix(NODE_NAME_SUFFIX) for name in names if name.endswith(NODE_NAME_SUFFIX)]
    return ids[0] if len(ids) == 1 else None


def _served_der(
    context: ssl.SSLContext, address: str, server_name: str | None, timeout_s: float
) -> bytes | None:
    """The DER certificate a TLS handshake with ``address`` under ``context`` is shown."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    with (
        socket.create_connection((host, int(port)), timeout=timeout_s) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        return tls.getpeercert(binary_form=True)
