"""What a server needs to serve, and a client to call, with the consortium's certificates.

A server serves mutual TLS when its configuration has a ``[tls]`` section, and plaintext
only when started with ``--insecure``: then it says so at start and on every round or cycle.
Its own certificate is checked before the port opens (:func:`check_credentials`), so an
expired, foreign, mismatched or world-readable one fails start-up with one clear line.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from tapestry.config import TlsConfig
from tapestry.errors import UserError
from tapestry.limits import MAX_CALLS_PER_NODE
from tapestry.pki.access import AccessPolicy, PeerRole, PlaintextWarning, RevocationList
from tapestry.pki.call_limits import CallLimits
from tapestry.pki.credentials import (
    check_credentials,
    load_channel_credentials,
    load_server_credentials,
)
from tapestry.pki.layout import spiffe_id
from tapestry.pki.server_check import ServerCertificateCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSecurity:
    """The server's TLS credentials and interceptors, the credentials it calls other servers
    with (the coordinator calls the nodes) and, with a CRL, the check that those servers'
    certificates are not revoked (``revocations``: the CRL, read again when it changes); all
    ``None``/empty for plaintext."""

    credentials: grpc.ServerCredentials | None = None
    interceptors: tuple[grpc.ServerInterceptor, ...] = ()
    channel_credentials: grpc.ChannelCredentials | None = None
    server_check: ServerCertificateCheck | None = None
    revocations: RevocationList | None = None


def server_security(
    tls: TlsConfig | None,
    *,
    insecure: bool,
    consortium: str,
    identity: tuple[PeerRole, str],
    rules: Mapping[str, Collection[PeerRole]],
    rounds: Collection[str],
    what: str,
    calls_per_node: int = MAX_CALLS_PER_NODE,
) -> ServerSecurity:
    """``identity`` is the ``(role, name)`` this server's certificate must name; ``rules``
    the roles each method admits (see :class:`AccessPolicy`); ``rounds`` the methods that
    log a warning on every call when serving plaintext; ``what`` names the server;
    ``calls_per_node`` how many calls a node may hold at once (:class:`CallLimits`)."""
    if tls is not None and insecure:
        raise UserError(
            f"{what}: the configuration has a [tls] section and --insecure was given; remove "
            "one (mutual TLS is the default; --insecure serves plaintext to anyone)"
        )
    if tls is None:
        if not insecure:
            raise UserError(
                f"{what}: the configuration has no [tls] section. Create the consortium's "
                "certificates with `tapestry certs init` and add [tls] ca, cert, key (and "
                "crl) to the file, or pass --insecure to serve plaintext without any "
                "authentication"
            )
        log.warning(
            "INSECURE: %s serves plaintext (--insecure): anyone who can reach its port can "
            "call it, read what it answers and pose as any member",
            what,
        )
        return ServerSecurity(interceptors=(PlaintextWarning(rounds, what),))
    role, name = identity
    check_credentials(
        tls.cert, tls.key, tls.ca, expect_san=spiffe_id(consortium, role, name), crl=tls.crl
    )
    revocations = RevocationList(tls.crl, tls.ca) if tls.crl is not None else None
    return ServerSecurity(
        credentials=load_server_credentials(tls.cert, tls.key, tls.ca),
        # Who may call, then how many calls each member may hold open at once.
        interceptors=(
            AccessPolicy(consortium, rules, revocations),
            CallLimits(per_node=calls_per_node),
        ),
        channel_credentials=load_channel_credentials(tls.cert, tls.key, tls.ca),
        revocations=revocations,
        server_check=(
            ServerCertificateCheck(tls, revocations) if revocations is not None else None
        ),
    )


def dialing_credentials(
    tls: TlsConfig | None,
    *,
    insecure: bool,
    consortium: str,
    identity: tuple[PeerRole, str],
    what: str,
) -> grpc.ChannelCredentials | None:
    """The credentials a member that dials out (a node, to its coordinator) presents:
    ``[tls]``'s, checked first (``identity`` is the ``(role, name)`` its certificate must
    name), or ``None`` over plaintext, allowed only with ``insecure`` and then logged as a
    warning, as :func:`server_security` does for a server."""
    if tls is not None and insecure:
        raise UserError(
            f"{what}: the configuration has a [tls] section and --insecure was given; remove "
            "one (mutual TLS is the default; --insecure dials in plaintext)"
        )
    if tls is None:
        if not insecure:
            raise UserError(
                f"{what}: the configuration has no [tls] section. Create the consortium's "
                "certificates with `tapestry certs init` and add [tls] ca, cert, key (and "
                "crl) to the file, or pass --insecure to dial in plaintext"
            )
        log.warning(
            "INSECURE: %s dials its coordinator in plaintext (--insecure): nothing proves "
            "the server is the coordinator, and anyone on the path reads the weights",
            what,
        )
        return None
    role, name = identity
    check_credentials(
        tls.cert, tls.key, tls.ca, expect_san=spiffe_id(consortium, role, name), crl=tls.crl
    )
    return load_channel_credentials(tls.cert, tls.key, tls.ca)


def client_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials | None:
    """Credentials for a client holding ``cert`` and ``key`` from the CA in ``ca``, checked
    first; ``None`` when none of the three is given (a plaintext client)."""
    given = [path for path in (ca, cert, key) if path is not None]
    if not given:
        return None
    if ca is None or cert is None or key is None:
        raise UserError("give all three of --ca, --cert and --key (or none, with --insecure)")
    check_credentials(cert, key, ca)
    return load_channel_credentials(cert, key, ca)
