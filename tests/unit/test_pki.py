"""The consortium PKI: `tapestry certs` writes the documented layout with the documented
permissions, and `check_credentials` refuses each unusable credential with one exact line."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tapestry.cli import main
from tapestry.errors import UserError
from tapestry.pki.authority import issue_certificate, load_authority, revoke_certificate
from tapestry.pki.credentials import CredentialError, certificate_sans, check_credentials
from tapestry.pki.layout import spiffe_id


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _init(root: Path, consortium: str = "acme") -> Path:
    result = _cli(
        "certs", "init", "--dir", str(root), "--consortium", consortium,
        "--coordinator-host", "coordinator,127.0.0.1",
        "--node", "eu=127.0.0.1,us", "--operator", "alice",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return _init(tmp_path / "pki")


def test_init_writes_the_documented_layout_with_key_files_0600(pki: Path) -> None:
    files = {str(path.relative_to(pki)): _mode(path) for path in pki.rglob("*") if path.is_file()}
    assert files == {
        "ca.pem": 0o644, "ca.key": 0o600, "crl.pem": 0o644,
        "coordinator/cert.pem": 0o644, "coordinator/key.pem": 0o600,
        "nodes/eu/cert.pem": 0o644, "nodes/eu/key.pem": 0o600,
        "nodes/us/cert.pem": 0o644, "nodes/us/key.pem": 0o600,
        "operators/alice/cert.pem": 0o644, "operators/alice/key.pem": 0o600,
    }  # fmt: skip


def test_each_certificate_names_its_identity_and_hosts_in_its_san(pki: Path) -> None:
    # The coordinator's also names it for a dialing node's handshake (COORDINATOR_SERVER_NAME).
    assert certificate_sans(_cert(pki / "coordinator/cert.pem")) == [
        "spiffe://acme/coordinator", "coordinator", "coordinator.tapestry.invalid", "127.0.0.1",
    ]  # fmt: skip
    # A node's certificate also names it for the coordinator's handshake (node_server_name).
    assert certificate_sans(_cert(pki / "nodes/eu/cert.pem")) == [
        "spiffe://acme/node/eu",
        "eu.node.tapestry.invalid",
        "127.0.0.1",
    ]
    assert certificate_sans(_cert(pki / "nodes/us/cert.pem")) == [
        "spiffe://acme/node/us",
        "us",
        "us.node.tapestry.invalid",
    ]
    assert certificate_sans(_cert(pki / "operators/alice/cert.pem")) == [
        "spiffe://acme/operator/alice"
    ]
    usages = _cert(pki / "operators/alice/cert.pem").extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    )
    assert list(usages.value) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_every_issued_certificate_passes_the_checks(pki: Path) -> None:
    for member, san in [
        ("coordinator", "spiffe://acme/coordinator"),
        ("nodes/eu", "spiffe://acme/node/eu"),
        ("operators/alice", "spiffe://acme/operator/alice"),
    ]:
        check_credentials(
            pki / member / "cert.pem", pki / member / "key.pem", pki / "ca.pem",
            expect_san=san, crl=pki / "crl.pem",
        )  # fmt: skip


def test_init_refuses_to_overwrite_an_existing_ca(pki: Path) -> None:
    before = (pki / "ca.key").read_bytes()
    result = _cli(
        "certs", "init", "--dir", str(pki), "--consortium", "acme", "--coordinator-host", "x"
    )
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {pki}/ca.pem already exists: refusing to overwrite the consortium CA "
        "(use `tapestry certs issue` to add a member, or choose another --dir)"
    )
    assert (pki / "ca.key").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--node", "a/b"],
            "Error: node 'a/b' is not a valid name: use 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit",
        ),
        (["--node", "eu,eu"], "Error: node 'eu' is given twice"),
        (
            ["--node", "eu=bad_host!"],
            "Error: host 'bad_host!' is neither an IP address nor a DNS name",
        ),
        (["--days", "0"], "Error: --days must be between 1 and 3650, got 0"),
    ],
)
def test_init_validates_everything_before_writing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    root = tmp_path / "pki"
    result = _cli(
        "certs",
        "init",
        "--dir",
        str(root),
        "--consortium",
        "acme",
        "--coordinator-host",
        "c",
        *args,
    )
    assert (result.exit_code, result.output.strip()) == (1, message)
    assert not root.exists()


def _check(pki: Path, member: str = "nodes/eu", **kwargs: object) -> None:
    check_credentials(pki / member / "cert.pem", pki / member / "key.pem", pki / "ca.pem", **kwargs)  # type: ignore[arg-type]


def test_check_refuses_an_expired_certificate(pki: Path) -> None:
    ca_cert, ca_key = load_authority(pki)
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    cert, key = issue_certificate(
        ca_cert, ca_key, common_name="old", identity=spiffe_id("acme", "node", "old"),
        server=True, not_before=start, not_after=start + dt.timedelta(days=30),
    )  # fmt: skip
    cert_path, key_path = pki / "old.pem", pki / "old.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    with pytest.raises(CredentialError) as caught:
        check_credentials(cert_path, key_path, pki / "ca.pem")
    assert str(caught.value) == (
        f"certificate {cert_path} expired on 2020-01-31 00:00:00 UTC: "
        "issue a new one with `tapestry certs issue`"
    )


def test_check_refuses_a_certificate_not_valid_yet(pki: Path) -> None:
    issued = _cert(pki / "nodes/eu/cert.pem").not_valid_before_utc
    with pytest.raises(CredentialError) as caught:
        _check(pki, now=issued - dt.timedelta(seconds=1))
    assert str(caught.value) == (
        f"certificate {pki}/nodes/eu/cert.pem is not valid yet: valid from "
        f"{issued:%Y-%m-%d %H:%M:%S} UTC"
    )


def test_check_refuses_a_certificate_from_another_ca(pki: Path, tmp_path: Path) -> None:
    other = _init(tmp_path / "other")
    with pytest.raises(CredentialError) as caught:
        check_credentials(other / "nodes/eu/cert.pem", other / "nodes/eu/key.pem", pki / "ca.pem")
    assert str(caught.value) == (
        f"certificate {other}/nodes/eu/cert.pem is not signed by the CA in {pki}/ca.pem"
    )


def test_check_refuses_a_certificate_without_the_expected_san(pki: Path) -> None:
    with pytest.raises(CredentialError) as caught:
        _check(pki, expect_san="spiffe://acme/node/us")
    assert str(caught.value) == (
        f"certificate {pki}/nodes/eu/cert.pem does not name 'spiffe://acme/node/us' in its SAN "
        "(it names spiffe://acme/node/eu, eu.node.tapestry.invalid, 127.0.0.1)"
    )


def test_check_refuses_a_key_that_does_not_match_the_certificate(pki: Path) -> None:
    with pytest.raises(CredentialError) as caught:
        check_credentials(pki / "nodes/eu/cert.pem", pki / "nodes/us/key.pem", pki / "ca.pem")
    assert str(caught.value) == (
        f"key {pki}/nodes/us/key.pem does not match the certificate {pki}/nodes/eu/cert.pem"
    )


def test_check_refuses_a_key_readable_by_others(pki: Path) -> None:
    (pki / "nodes/eu/key.pem").chmod(0o644)
    with pytest.raises(CredentialError) as caught:
        _check(pki)
    assert str(caught.value) == (
        f"key {pki}/nodes/eu/key.pem is readable by group or others (mode 0644): "
        f"run `chmod 600 {pki}/nodes/eu/key.pem`"
    )


def test_a_certificate_and_key_given_the_wrong_way_round_are_called_swapped(pki: Path) -> None:
    """Not `chmod 600` on the certificate (readable by all, as a certificate is): that
    advice only led to the next error."""
    cert, key = pki / "nodes/eu/cert.pem", pki / "nodes/eu/key.pem"
    with pytest.raises(CredentialError) as caught:
        check_credentials(key, cert, pki / "ca.pem")
    assert str(caught.value) == (
        f"the certificate and key look swapped: certificate {key} holds a private key and "
        f"key {cert} a certificate; give {cert} as the certificate and {key} as the key"
    )
    with pytest.raises(CredentialError) as caught:
        check_credentials(cert, cert, pki / "ca.pem")
    assert str(caught.value) == (
        f"key {cert} holds a certificate, not a private key; give the certificate's own key "
        "file (key.pem beside cert.pem in `tapestry certs`' layout)"
    )


def test_a_client_given_swapped_files_is_told_so_in_one_line(pki: Path) -> None:
    member = pki / "operators/alice"
    result = _cli(
        "rounds", "--coordinator", "127.0.0.1:1", "--ca", str(pki / "ca.pem"),
        "--cert", str(member / "key.pem"), "--key", str(member / "cert.pem"),
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: the certificate and key look swapped: certificate {member}/key.pem holds a "
        f"private key and key {member}/cert.pem a certificate; give {member}/cert.pem as the "
        f"certificate and {member}/key.pem as the key"
    )


def test_check_refuses_a_revoked_certificate(pki: Path) -> None:
    result = _cli("certs", "revoke", "--dir", str(pki), "--node", "eu")
    serial = _cert(pki / "nodes/eu/cert.pem").serial_number
    assert result.output.strip() == f"node eu: certificate {serial:x} revoked in {pki}/crl.pem"
    _check(pki)  # without the CRL the certificate is still well formed
    with pytest.raises(CredentialError) as caught:
        _check(pki, crl=pki / "crl.pem")
    assert str(caught.value) == (
        f"certificate {pki}/nodes/eu/cert.pem is revoked (serial {serial:x} in {pki}/crl.pem)"
    )
    _check(pki, member="nodes/us", crl=pki / "crl.pem")  # the others are untouched


def test_issue_adds_a_node_and_an_operator_signed_by_the_same_ca(pki: Path) -> None:
    assert (
        _cli("certs", "issue", "--dir", str(pki), "--node", "sg", "--host", "10.0.0.7").exit_code
        == 0
    )
    assert _cli("certs", "issue", "--dir", str(pki), "--operator", "bob").exit_code == 0
    _check(pki, member="nodes/sg", expect_san="spiffe://acme/node/sg", crl=pki / "crl.pem")
    _check(pki, member="operators/bob", expect_san="spiffe://acme/operator/bob")
    assert certificate_sans(_cert(pki / "nodes/sg/cert.pem")) == [
        "spiffe://acme/node/sg",
        "sg.node.tapestry.invalid",
        "10.0.0.7",
    ]
    assert _mode(pki / "nodes/sg/key.pem") == 0o600


def test_issue_replaces_a_certificate_only_once_it_is_revoked(pki: Path) -> None:
    result = _cli("certs", "issue", "--dir", str(pki), "--node", "us", "--host", "us")
    assert (result.exit_code, result.output.strip()) == (
        1,
        f"Error: node 'us' already has a valid certificate at {pki}/nodes/us/cert.pem: "
        "revoke it first (`tapestry certs revoke --node us`)",
    )
    old = _cert(pki / "nodes/us/cert.pem").serial_number
    assert _cli("certs", "revoke", "--dir", str(pki), "--node", "us").exit_code == 0
    assert (
        _cli("certs", "issue", "--dir", str(pki), "--node", "us", "--host", "us.example").exit_code
        == 0
    )
    assert _cert(pki / "nodes/us/cert.pem").serial_number != old
    _check(pki, member="nodes/us", crl=pki / "crl.pem")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node", "sg"], "Error: a node certificate needs the node's host (--host)"),
        (["--operator", "bob", "--host", "h"], "Error: --host goes with --node, not --operator"),
        ([], "Error: give exactly one of --node or --operator"),
    ],
)
def test_issue_refuses_incomplete_requests(pki: Path, args: list[str], message: str) -> None:
    result = _cli("certs", "issue", "--dir", str(pki), *args)
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == message


def test_issue_without_a_ca_names_the_command_to_run(tmp_path: Path) -> None:
    result = _cli("certs", "issue", "--dir", str(tmp_path), "--operator", "bob")
    assert result.output.strip() == (
        f"Error: no consortium CA at {tmp_path}/ca.pem: run `tapestry certs init --dir {tmp_path}` first"
    )


def test_revoke_keeps_earlier_revocations_and_refuses_twice(pki: Path) -> None:
    assert _cli("certs", "revoke", "--dir", str(pki), "--node", "eu").exit_code == 0
    assert _cli("certs", "revoke", "--dir", str(pki), "--operator", "alice").exit_code == 0
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert {entry.serial_number for entry in crl} == {
        _cert(pki / "nodes/eu/cert.pem").serial_number,
        _cert(pki / "operators/alice/cert.pem").serial_number,
    }
    result = _cli("certs", "revoke", "--dir", str(pki), "--node", "eu")
    assert result.output.strip() == f"Error: {pki}/nodes/eu/cert.pem is already revoked"


def test_revoke_refuses_the_ca_and_a_foreign_certificate(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        revoke_certificate(pki, pki / "ca.pem")
    assert str(caught.value) == (
        "refusing to revoke the consortium CA: start a new consortium with `tapestry certs init` instead"
    )
    other = _init(tmp_path / "other", consortium="other")
    with pytest.raises(UserError) as caught:
        revoke_certificate(pki, other / "nodes/eu/cert.pem")
    assert str(caught.value) == (
        f"{other}/nodes/eu/cert.pem was not issued by the consortium CA at {pki}/ca.pem"
    )
    result = _cli("certs", "revoke", "--dir", str(pki), "--node", "nobody")
    assert (
        result.output.strip()
        == f"Error: no certificate at {pki}/nodes/nobody/cert.pem: nothing to revoke"
    )
