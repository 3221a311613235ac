"""Load the consortium's PEM files into gRPC credentials, check them at start-up, and name
the peer of a call.

gRPC checks the chain on every handshake but not the CRL (the Python API offers no
revocation hook), so :func:`check_credentials` refuses a revoked certificate of our own at
start-up, and a server refuses a revoked peer by its :func:`peer_identity`.
"""

from __future__ import annotations

import datetime as dt
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tapestry.errors import UserError

# The auth-context property gRPC fills with every SAN of the peer's certificate.
SAN_PROPERTY = "x509_subject_alternative_name"
SPIFFE_PREFIX = "spiffe://"


class CredentialError(UserError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{what} {path} does not exist") from None


def load_server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """TLS server credentials that require every client to present a certificate from ``ca``."""
    return grpc.ssl_server_credentials(
        [(_read(key, "key"), _read(cert, "certificate"))],
        root_certificates=_read(ca, "CA certificate"),
        require_client_auth=True,
    )


def load_channel_credentials(cert: Path, key: Path, ca: Path) -> grpc.ChannelCredentials:
    """TLS channel credentials that present ``cert`` and trust only servers from ``ca``."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "key"),
        certificate_chain=_read(cert, "certificate"),
    )


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, what))
    except ValueError:
        raise CredentialError(f"{what} {path} is not a PEM certificate") from None


def certificate_sans(cert: x509.Certificate) -> list[str]:
    """Every SAN of ``cert`` as text: URIs, DNS names and IP addresses."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *sans.get_values_for_type(x509.UniformResourceIdentifier),
        *sans.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
    ]


def check_credentials(
    cert: Path,
    key: Path,
    ca: Path,
    *,
    expect_san: str | None = None,
    crl: Path | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Refuse, with one line naming the file and the fix, credentials that a handshake would
    reject or that must not be used: a key readable by group or others, a certificate not
    valid now, not signed by ``ca``, not matching ``key``, without ``expect_san``, or listed
    in ``crl``; a certificate and key given the wrong way round are named as such."""
    _check_contents(cert, key)
    mode = stat.S_IMODE(key.stat().st_mode) if key.exists() else 0
    if mode & 0o077:
        raise CredentialError(
            f"key {key} is readable by group or others (mode {mode:04o}): run `chmod 600 {key}`"
        )
    certificate = _load_cert(cert, "certificate")
    authority = _load_cert(ca, "CA certificate")
    now = now or dt.datetime.now(dt.UTC)
    if now < certificate.not_valid_before_utc:
        raise CredentialError(
            f"certificate {cert} is not valid yet: valid from "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    if now > certificate.not_valid_after_utc:
        raise CredentialError(
            f"certificate {cert} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} "
            "UTC: issue a new one with `tapestry certs issue`"
        )
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialError(f"certificate {cert} is not signed by the CA in {ca}") from None
    try:
        private_key = serialization.load_pem_private_key(_read(key, "key"), password=None)
    except (ValueError, TypeError):
        raise CredentialError(f"key {key} is not an unencrypted PEM private key") from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private_key.public_key().public_bytes(*public) != certificate.public_key().public_bytes(
        *public
    ):
        raise CredentialError(f"key {key} does not match the certificate {cert}")
    if expect_san is not None:
        sans = certificate_sans(certificate)
        if expect_san not in sans:
            raise CredentialError(
                f"certificate {cert} does not name {expect_san!r} in its SAN "
                f"(it names {', '.join(sans) or 'nothing'})"
            )
    if crl is not None and certificate.serial_number in revoked_serials(crl, ca):
        raise CredentialError(
            f"certificate {cert} is revoked (serial {certificate.serial_number:x} in {crl})"
        )


_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY = b"PRIVATE KEY-----"  # BEGIN PRIVATE KEY, BEGIN EC PRIVATE KEY, ...


def _holds(path: Path) -> str | None:
    """What a PEM file holds by its header: ``"a certificate"``, ``"a private key"`` or
    None (missing, unreadable or neither: the checks that follow say what is wrong)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if _PEM_CERTIFICATE in data:
        return "a certificate"
    return "a private key" if _PEM_PRIVATE_KEY in data else None


def _check_contents(cert: Path, key: Path) -> None:
    """Refuse a certificate and key given the wrong way round (or a key file holding a
    certificate) before the key's permissions are judged: advice to ``chmod`` a
    certificate only leads to the next error."""
    in_cert, in_key = _holds(cert), _holds(key)
    if in_cert == "a private key" and in_key == "a certificate":
        raise CredentialError(
            f"the certificate and key look swapped: certificate {cert} holds a private key "
            f"and key {key} a certificate; give {key} as the certificate and {cert} as the key"
        )
    if in_key == "a certificate":
        raise CredentialError(
            f"key {key} holds a certificate, not a private key; give the certificate's own "
            "key file (key.pem beside cert.pem in `tapestry certs`' layout)"
        )
    if in_cert == "a private key":
        raise CredentialError(
            f"certificate {cert} holds a private key, not a certificate; give the member's "
            "cert.pem as the certificate"
        )


def revoked_serials(crl: Path, ca: Path) -> frozenset[int]:
    """The serial numbers revoked by ``crl``, refused unless the CA in ``ca`` signed it."""
    try:
        revocations = x509.load_pem_x509_crl(_read(crl, "CRL"))
    except ValueError:
        raise CredentialError(f"CRL {crl} is not a PEM CRL") from None
    issuer_key = _load_cert(ca, "CA certificate").public_key()
    if not isinstance(issuer_key, ec.EllipticCurvePublicKey) or not (
        revocations.is_signature_valid(issuer_key)
    ):
        raise CredentialError(f"CRL {crl} is not signed by the CA in {ca}")
    return frozenset(entry.serial_number for entry in revocations)


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The ``spiffe://`` URI SAN of the calling peer's certificate, or None for a peer
    without one (no TLS, or a certificate that names no identity)."""
    # At run time each property is a list of bytes; the stubs say ``Mapping[str, bytes]``.
    auth: Mapping[str, Sequence[bytes]] = cast(Any, context.auth_context())
    uris = [
        value.decode("utf-8", "replace")
        for value in auth.get(SAN_PROPERTY, [])
        if value.startswith(SPIFFE_PREFIX.encode())
    ]
    return uris[0] if len(uris) == 1 else None
