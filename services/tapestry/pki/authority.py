"""Issue and revoke the consortium's certificates (layout and SAN scheme: :mod:`tapestry.pki`).

Everything a command asks for is validated before the first file is written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tapestry.atomic_files import write_bytes
from tapestry.errors import UserError, quoted
from tapestry.limits import MAX_DAYS
from tapestry.pki.credentials import revoked_serials
from tapestry.pki.layout import (
    CERT_MODE,
    COORDINATOR_SERVER_NAME,
    KEY_MODE,
    Layout,
    Role,
    cert_pem,
    check_name,
    key_pem,
    node_server_name,
    san_for_host,
    spiffe_id,
    write_new,
    write_pair,
)

DEFAULT_DAYS = 365


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    identity: str,
    hosts: Sequence[str] = (),
    server: bool,
    server_names: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = DEFAULT_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate and its new key, signed by the CA: ``identity`` as its URI SAN,
    ``hosts`` as DNS/IP SANs, ``server_names`` as DNS SANs taken as they are (a node's
    :func:`~tapestry.pki.layout.node_server_name`); TLS client auth always, server auth when
    ``server``."""
    key = _new_key()
    start = not_before or _now() - dt.timedelta(minutes=5)  # tolerate small clock skew
    end = not_after or start + dt.timedelta(days=days)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + (
        [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    )
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
    sans += [san_for_host(host) for host in hosts]
    sans += [x509.DNSName(name) for name in server_names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(
    consortium: str, *, days: int = MAX_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed consortium CA; the consortium id is its organisation name."""
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, consortium),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Tapestry consortium {consortium} CA"),
        ]
    )
    start = _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _check_days(days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise UserError(f"--days must be between 1 and {MAX_DAYS}, got {days}")


def _check_unique(what: str, names: Sequence[str]) -> None:
    for name in names:
        check_name(what, name)
        if names.count(name) > 1:
            raise UserError(f"{what} {quoted(name)} is given twice")


def init_consortium(
    root: Path,
    consortium: str,
    *,
    coordinator_hosts: Sequence[str],
    nodes: Sequence[tuple[str, str]],
    operators: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
) -> Layout:
    """Create the CA, the coordinator's certificate, one per ``(node_id, host)`` and one per
    operator under ``root``. Refuses to overwrite an existing CA."""
    layout = Layout(root)
    check_name("consortium", consortium)
    _check_days(days)
    if not coordinator_hosts:
        raise UserError("give the coordinator at least one host (--coordinator-host)")
    for host in coordinator_hosts:
        san_for_host(host)
    _check_unique("node", [node_id for node_id, _ in nodes])
    for _, host in nodes:
        san_for_host(host)
    _check_unique("operator", list(operators))
    if layout.ca_cert.exists() or layout.ca_key.exists():
        raise UserError(
            f"{layout.ca_cert} already exists: refusing to overwrite the consortium CA "
            "(use `tapestry certs issue` to add a member, or choose another --dir)"
        )
    ca_cert, ca_key = create_ca(consortium)
    write_new(layout.ca_key, key_pem(ca_key), KEY_MODE)
    write_new(layout.ca_cert, cert_pem(ca_cert), CERT_MODE)
    _write_crl(layout, ca_cert, ca_key, [])
    cert, key = issue_certificate(
        ca_cert,
        ca_key,
        common_name=f"{consortium} coordinator",
        identity=spiffe_id(consortium, "coordinator"),
        hosts=coordinator_hosts,
        server=True,
        server_names=[COORDINATOR_SERVER_NAME],
        days=days,
    )
    write_pair(layout.coordinator, cert, key)
    for node_id, host in nodes:
        _issue_member(layout, ca_cert, ca_key, "node", node_id, host, days)
    for name in operators:
        _issue_member(layout, ca_cert, ca_key, "operator", name, None, days)
    return layout


def load_authority(root: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    layout = Layout(root)
    try:
        ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    except FileNotFoundError as error:
        raise UserError(
            f"no consortium CA at {error.filename}: run `tapestry certs init --dir {root}` first"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{layout.ca_key} is not an ECDSA key")
    return ca_cert, ca_key


def consortium_of(ca_cert: x509.Certificate) -> str:
    names = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(names[0].value) if names else ""


def consortium_named_by(ca_cert: Path) -> str:
    """The consortium id a CA certificate file names ("" for none)."""
    return consortium_of(x509.load_pem_x509_certificate(ca_cert.read_bytes()))


def _issue_member(
    layout: Layout,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    role: Role,
    name: str,
    host: str | None,
    days: int,
) -> Path:
    cert, key = issue_certificate(
        ca_cert,
        ca_key,
        common_name=f"{role} {name}",
        identity=spiffe_id(consortium_of(ca_cert), role, name),
        hosts=[host] if host else [],
        server=role == "node",
        server_names=[node_server_name(name)] if role == "node" else [],
        days=days,
    )
    directory = layout.member(role, name)
    write_pair(directory, cert, key)
    return directory


def issue_member(
    root: Path, role: Role, name: str, *, host: str | None = None, days: int = DEFAULT_DAYS
) -> Path:
    """One more node (``host`` required) or operator certificate, signed by the existing CA.
    Refuses to replace a certificate that has not been revoked."""
    layout = Layout(root)
    check_name(role, name)
    _check_days(days)
    if role == "node":
        if not host:
            raise UserError("a node certificate needs the node's host (--host)")
        san_for_host(host)
    ca_cert, ca_key = load_authority(root)
    existing = layout.member(role, name) / "cert.pem"
    if existing.exists():
        serial = x509.load_pem_x509_certificate(existing.read_bytes()).serial_number
        revoked = revoked_serials(layout.crl, layout.ca_cert) if layout.crl.exists() else set()
        if serial not in revoked:
            raise UserError(
                f"{role} {quoted(name)} already has a valid certificate at {existing}: "
                f"revoke it first (`tapestry certs revoke --{role} {name}`)"
            )
    return _issue_member(layout, ca_cert, ca_key, role, name, host, days)


def _write_crl(
    layout: Layout,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    entries: Sequence[x509.RevokedCertificate],
) -> None:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=DEFAULT_DAYS))
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    write_bytes(layout.crl, crl.public_bytes(serialization.Encoding.PEM), mode=CERT_MODE)


def revoke_certificate(root: Path, cert_path: Path) -> int:
    """Add the certificate at ``cert_path`` to ``crl.pem`` (re-signed by the CA) and return
    its serial number. Refuses the CA itself and a certificate the CA did not issue."""
    layout = Layout(root)
    ca_cert, ca_key = load_authority(root)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"no certificate at {cert_path}: nothing to revoke") from None
    if cert.serial_number == ca_cert.serial_number or cert.subject == ca_cert.subject:
        raise UserError(
            "refusing to revoke the consortium CA: start a new consortium with "
            "`tapestry certs init` instead"
        )
    if cert.issuer != ca_cert.subject:
        raise UserError(f"{cert_path} was not issued by the consortium CA at {layout.ca_cert}")
    previous = list(x509.load_pem_x509_crl(layout.crl.read_bytes())) if layout.crl.exists() else []
    if any(entry.serial_number == cert.serial_number for entry in previous):
        raise UserError(f"{cert_path} is already revoked")
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(cert.serial_number)
        .revocation_date(_now())
        .build()
    )
    _write_crl(layout, ca_cert, ca_key, [*previous, entry])
    return cert.serial_number


def revoke_member(root: Path, role: Role, name: str) -> int:
    check_name(role, name)
    return revoke_certificate(root, Layout(root).member(role, name) / "cert.pem")
