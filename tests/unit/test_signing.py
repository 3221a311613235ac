"""Signatures by consortium members (tapestry.pki.signing): a signature holds only for the
bytes signed, by a certificate the consortium CA issued, valid then and not revoked; each
refusal says which check failed."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from tapestry.pki.access import PeerRole
from tapestry.pki.authority import (
    init_consortium,
    issue_certificate,
    load_authority,
    revoke_member,
)
from tapestry.pki.credentials import revoked_serials
from tapestry.pki.layout import Layout, spiffe_id
from tapestry.pki.signing import Signature, SignatureError, Signer, verify_signature

PAYLOAD = b"round 3: base 0123abcd"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    root = tmp_path_factory.mktemp("pki")
    return init_consortium(
        root, "acme", coordinator_hosts=["127.0.0.1"], nodes=[("eu", "127.0.0.1")],
        operators=["alice"],
    )  # fmt: skip


def _signer(pki: Layout, role: PeerRole = "coordinator", name: str = "") -> Signer:
    pair = pki.holder(role, name)
    return Signer.from_files(pair / "cert.pem", pair / "key.pem", pki.ca_cert)


def _ca(pki: Layout) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())


def test_a_signature_names_its_signer(pki: Layout) -> None:
    coordinator = _signer(pki)
    signed = coordinator.sign(PAYLOAD)
    who = verify_signature(signed, PAYLOAD, _ca(pki), revoked_serials(pki.crl, pki.ca_cert))
    assert (who.consortium, who.role, who.name) == ("acme", "coordinator", "")
    assert who.uri == "spiffe://acme/coordinator" == coordinator.identity.uri  # type: ignore[union-attr]
    node = verify_signature(_signer(pki, "node", "eu").sign(PAYLOAD), PAYLOAD, _ca(pki))
    assert node.uri == "spiffe://acme/node/eu"


def test_changed_bytes_or_a_changed_signature_are_refused(pki: Layout) -> None:
    signed = _signer(pki).sign(PAYLOAD)
    with pytest.raises(SignatureError, match=r"^the signature by spiffe://acme/coordinator "
                       r"does not match the signed bytes \(changed since signed\)$"):  # fmt: skip
        verify_signature(signed, PAYLOAD + b" ", _ca(pki))
    flipped = bytearray(signed.signature)
    flipped[-1] ^= 1
    with pytest.raises(SignatureError, match="does not match the signed bytes"):
        verify_signature(dataclasses.replace(signed, signature=bytes(flipped)), PAYLOAD, _ca(pki))
    with pytest.raises(SignatureError, match="incomplete"):
        verify_signature(Signature(signed.certificate, b""), PAYLOAD, _ca(pki))


def test_a_certificate_of_another_ca_is_refused(pki: Layout, tmp_path: Path) -> None:
    other = init_consortium(tmp_path / "other", "acme", coordinator_hosts=["h"], nodes=[])
    signed = _signer(other).sign(PAYLOAD)
    with pytest.raises(SignatureError, match=r"^the signer's certificate "
                       r"\(spiffe://acme/coordinator\) is not issued by the consortium CA$"):  # fmt: skip
        verify_signature(signed, PAYLOAD, _ca(pki))


def test_a_revoked_certificate_is_refused(tmp_path: Path) -> None:
    pki = init_consortium(tmp_path, "acme", coordinator_hosts=["h"], nodes=[("eu", "h")])
    signed = _signer(pki, "node", "eu").sign(PAYLOAD)
    serial = revoke_member(tmp_path, "node", "eu")
    with pytest.raises(SignatureError, match=rf"^the signer's certificate \(spiffe://acme/node/eu, "
                       rf"serial {serial:x}\) is revoked$"):  # fmt: skip
        verify_signature(signed, PAYLOAD, _ca(pki), revoked_serials(pki.crl, pki.ca_cert))


def test_a_certificate_not_valid_when_signed_or_of_another_consortium(tmp_path: Path) -> None:
    pki = init_consortium(tmp_path, "acme", coordinator_hosts=["h"], nodes=[])
    ca_cert, ca_key = load_authority(tmp_path)
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    old, old_key = issue_certificate(
        ca_cert, ca_key, common_name="old", identity=spiffe_id("acme", "operator", "bob"),
        server=False, not_before=start, not_after=start + dt.timedelta(days=1),
    )  # fmt: skip
    signed = Signer(old, old_key).sign(PAYLOAD)
    with pytest.raises(SignatureError, match=r"\(spiffe://acme/operator/bob\) was not valid at"):
        verify_signature(signed, PAYLOAD, ca_cert)
    at = start + dt.timedelta(hours=1)
    assert verify_signature(signed, PAYLOAD, ca_cert, at=at).name == "bob"
    foreign, foreign_key = issue_certificate(
        ca_cert, ca_key, common_name="x", identity=spiffe_id("other", "operator", "eve"),
        server=False,
    )  # fmt: skip
    with pytest.raises(SignatureError, match=r"names no member of consortium 'acme'$"):
        verify_signature(Signer(foreign, foreign_key).sign(PAYLOAD), PAYLOAD, _ca(pki))


def test_a_signer_refuses_a_key_of_another_certificate(pki: Layout) -> None:
    ca_cert, ca_key = load_authority(pki.root)
    cert, _ = issue_certificate(
        ca_cert, ca_key, common_name="x", identity=spiffe_id("acme", "operator", "x"), server=False
    )
    _, other_key = issue_certificate(
        ca_cert, ca_key, common_name="y", identity=spiffe_id("acme", "operator", "y"), server=False
    )
    with pytest.raises(SignatureError, match="does not match its certificate"):
        Signer(cert, other_key)
