"""Sign bytes with a consortium member's key, and check such a signature against the CA.

A :class:`Signature` carries the signer's certificate (DER) and an ECDSA-SHA256 signature
(DER-encoded ``(r, s)``) over some bytes; the consortium's keys are P-256
(:mod:`tapestry.pki`). Whoever checks it needs only the consortium CA's certificate and its
revoked serials (:func:`~tapestry.pki.credentials.revoked_serials`): it holds no list of
members' keys, since the CA's signature on the certificate vouches for the key, and the
certificate's URI SAN says who signed (``spiffe://<consortium>/<role>[/<name>]``, read as
:class:`~tapestry.pki.access.Peer`).

What the bytes are is the caller's business, so the same two functions serve every signed
thing (the coordinator's journal records, a member's contribution header): a caller defines
its canonical bytes once and documents them where the signature is stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tapestry.errors import UserError
from tapestry.limits import MAX_SIGNATURE_BYTES, MAX_SIGNER_CERTIFICATE_BYTES
from tapestry.pki.access import Peer, peer_of_certificate
from tapestry.pki.authority import consortium_of
from tapestry.pki.credentials import check_credentials

_ALGORITHM = ec.ECDSA(hashes.SHA256())


class SignatureError(UserError):
    """A signature that does not hold: the message says what is wrong with it."""


@dataclass(frozen=True)
class Signature:
    """``signature`` (ECDSA-SHA256, DER) over some bytes, by the holder of ``certificate``
    (DER)."""

    certificate: bytes
    signature: bytes


class Signer:
    """Signs with a member's certificate and key (a server's ``[tls]`` cert and key)."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if certificate.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
            raise SignatureError("the signing key does not match its certificate")
        self.certificate = certificate
        self._key = key
        self._der = certificate.public_bytes(serialization.Encoding.DER)

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path) -> Signer:
        """The signer of ``cert`` and ``key`` (PEM), checked as a server checks its own
        credentials at start-up (issued by ``ca``, valid now, the key matching)."""
        check_credentials(cert, key, ca)
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise SignatureError(f"key {key} is not an ECDSA key: it cannot sign")
        return cls(certificate, private)

    @property
    def identity(self) -> Peer | None:
        """Who signs, as the certificate names it."""
        return peer_of_certificate(self.certificate)

    def sign(self, payload: bytes) -> Signature:
        """``payload`` signed: ECDSA-SHA256 with this signer's key, with its certificate."""
        return Signature(self._der, self._key.sign(payload, _ALGORITHM))


def verify_signature(
    signature: Signature,
    payload: bytes,
    ca_cert: x509.Certificate,
    revoked_serials: Collection[int] = (),
    *,
    at: dt.datetime | None = None,
) -> Peer:
    """Who signed ``payload``: the signer's identity once every check holds, else
    :class:`SignatureError` saying which failed. Checks that the certificate was issued by
    ``ca_cert`` (its signature on it) and names a member of that CA's consortium, that it was
    valid at ``at`` (default: now; pass when the signature claims to be made), that its
    serial is not in ``revoked_serials``, and that the signature is its key's over
    ``payload``."""
    certificate = _certificate(signature)
    who = peer_of_certificate(certificate)
    named = who.uri if who is not None else f"serial {certificate.serial_number:x}"
    try:
        certificate.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise SignatureError(
            f"the signer's certificate ({named}) is not issued by the consortium CA"
        ) from None
    consortium = consortium_of(ca_cert)
    if who is None or who.consortium != consortium:
        raise SignatureError(
            f"the signer's certificate ({named}) names no member of consortium {consortium!r}"
        )
    moment = at or dt.datetime.now(dt.UTC)
    if not certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc:
        raise SignatureError(
            f"the signer's certificate ({named}) was not valid at {moment:%Y-%m-%d %H:%M:%S} "
            f"UTC (valid {certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} to "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC)"
        )
    if certificate.serial_number in revoked_serials:
        raise SignatureError(
            f"the signer's certificate ({named}, serial {certificate.serial_number:x}) is revoked"
        )
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"the signer's certificate ({named}) holds no ECDSA key")
    try:
        key.verify(signature.signature, payload, _ALGORITHM)
    except InvalidSignature:
        raise SignatureError(
            f"the signature by {named} does not match the signed bytes (changed since signed)"
        ) from None
    return who


def _certificate(signature: Signature) -> x509.Certificate:
    if not signature.certificate or not signature.signature:
        raise SignatureError("the signature is incomplete: no certificate or no signature bytes")
    if len(signature.certificate) > MAX_SIGNER_CERTIFICATE_BYTES:
        raise SignatureError(
            f"the signer's certificate is {len(signature.certificate)} bytes, past the bound "
            f"of {MAX_SIGNER_CERTIFICATE_BYTES}"
        )
    if len(signature.signature) > MAX_SIGNATURE_BYTES:
        raise SignatureError(
            f"the signature is {len(signature.signature)} bytes, past the bound of "
            f"{MAX_SIGNATURE_BYTES}"
        )
    try:
        return x509.load_der_x509_certificate(signature.certificate)
    except ValueError:
        raise SignatureError("the signer's certificate is not a DER X.509 certificate") from None
