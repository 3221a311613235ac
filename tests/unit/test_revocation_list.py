"""The CRL a server checks every call against: read again when it changes, kept when it
breaks or disappears (with an error logged), refused when unusable at start-up."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tapestry.pki.access import RevocationList
from tapestry.pki.authority import init_consortium, revoke_member
from tapestry.pki.credentials import CredentialError


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_consortium(
        tmp_path / "pki", "acme", coordinator_hosts=["127.0.0.1"], nodes=[("eu", "127.0.0.1")],
        operators=["alice"],
    )  # fmt: skip
    return tmp_path / "pki"


def _bump(path: Path) -> None:
    """Make the file look changed even within one mtime tick."""
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))


def test_a_revocation_is_seen_without_a_restart(pki: Path) -> None:
    revocations = RevocationList(pki / "crl.pem", pki / "ca.pem")
    assert revocations.serials() == frozenset()
    serial = revoke_member(pki, "operator", "alice")
    _bump(pki / "crl.pem")
    assert revocations.serials() == {serial}


def test_a_broken_or_missing_crl_keeps_the_last_good_list(pki: Path, caplog) -> None:
    serial = revoke_member(pki, "node", "eu")
    revocations = RevocationList(pki / "crl.pem", pki / "ca.pem")
    (pki / "crl.pem").write_text("not a CRL")
    _bump(pki / "crl.pem")
    with caplog.at_level(logging.ERROR):
        assert revocations.serials() == {serial}
    (pki / "crl.pem").unlink()
    with caplog.at_level(logging.ERROR):
        assert revocations.serials() == {serial}
    assert [r.getMessage() for r in caplog.records] == [
        f"keeping the previous revocation list: CRL {pki}/crl.pem is not a PEM CRL",
        f"keeping the previous revocation list: CRL {pki}/crl.pem is gone",
    ]


def test_an_unusable_crl_at_start_up_is_refused(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="does not exist"):
        RevocationList(tmp_path / "none.pem", pki / "ca.pem")
    other = tmp_path / "other"
    init_consortium(other, "acme", coordinator_hosts=["x"], nodes=[])
    with pytest.raises(CredentialError, match="is not signed by the CA"):
        RevocationList(other / "crl.pem", pki / "ca.pem")
