"""The files of a certificate directory and the names in them: where each file lives, how a
key or certificate is written (a key is created 0600 and never exists with wider
permissions, even for an instant), and which node ids, operator names and hosts are valid."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tapestry.errors import UserError, quoted

Role = Literal["node", "operator"]
# Names become directory names and URI path segments: no slashes, dots only inside.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
KEY_MODE = 0o600
CERT_MODE = 0o644


@dataclass(frozen=True)
class Layout:
    """Where each file of a certificate directory lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    def member(self, role: Role, name: str) -> Path:
        return self.root / ("nodes" if role == "node" else "operators") / name

    def holder(self, role: Literal["coordinator", "node", "operator"], name: str = "") -> Path:
        """The folder of the certificate and key of the coordinator or of a member."""
        return self.coordinator if role == "coordinator" else self.member(role, name)


def spiffe_id(
    consortium: str, role: Literal["coordinator", "node", "operator"], name: str = ""
) -> str:
    """The URI SAN that names a peer: ``spiffe://<consortium>/<role>[/<name>]``."""
    return f"spiffe://{consortium}/{role}" + (f"/{name}" if name else "")


# The DNS name a node's certificate carries besides its hosts, and the name the coordinator
# asks for when it connects to that node (gRPC's target name override): the TLS handshake
# itself then checks that the server is that node. ``.invalid`` never resolves (RFC 2606),
# so no host can be given such a name, and only a node's own certificate carries it.
NODE_NAME_SUFFIX = ".node.tapestry.invalid"


# The DNS name the coordinator's certificate carries besides its hosts, and the name a node
# asks for when it dials the coordinator: the handshake then proves that the server is the
# consortium's coordinator, not another member whose certificate names the same host.
COORDINATOR_SERVER_NAME = "coordinator.tapestry.invalid"


def node_server_name(node_id: str) -> str:
    return node_id + NODE_NAME_SUFFIX


def check_name(what: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UserError(
            f"{what} {quoted(name)} is not a valid name: use 1-63 letters, digits, '.', '_' "
            "or '-', starting and ending with a letter or digit"
        )
    return name


def san_for_host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST.fullmatch(host):
        raise UserError(f"host {quoted(host)} is neither an IP address nor a DNS name")
    if host.lower().endswith(".invalid"):
        raise UserError(
            f"host {quoted(host)} is in the reserved domain .invalid, which names nodes only"
        )
    return x509.DNSName(host)


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte (O_EXCL: never over a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed a certificate's 0644
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pair(directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    for name in ("cert.pem", "key.pem"):
        (directory / name).unlink(missing_ok=True)
    write_new(directory / "key.pem", key_pem(key), KEY_MODE)
    write_new(directory / "cert.pem", cert_pem(cert), CERT_MODE)


def _split(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_nodes(values: Sequence[str]) -> list[tuple[str, str]]:
    """``--node`` values ``ID`` or ``ID=HOST`` (comma-separated allowed); a bare id's host
    is the id itself, as in compose where each node's service is named after it."""
    nodes = []
    for item in _split(values):
        node_id, _, host = item.partition("=")
        nodes.append((node_id, host or node_id))
    return nodes


def split_list(values: Sequence[str]) -> list[str]:
    return _split(values)
