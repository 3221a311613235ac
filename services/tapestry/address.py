"""What an address may be: ``HOST:PORT``, checked in one place for the CLI and the
configuration files. Kept free of heavy imports (``tapestry health`` uses it)."""

from __future__ import annotations

import ipaddress
import re

# A DNS name or IPv4 address (labels of letters, digits, '-' and '_'), or [IPv6].
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")


def check_address(value: str, *, free_port: bool = False) -> str:
    """``value`` if it is ``HOST:PORT`` with a port in 1..65535, else :class:`ValueError`
    saying what is wrong. ``free_port`` also allows port 0 (a server's "pick a free port").

    The one check for every address: the CLI's ``--listen``/``--coordinator``/``--address``
    and the consortium file's member ``address``. gRPC itself would take ``127.0.0.1`` as
    port 443, which no Tapestry server uses.
    """
    low = 0 if free_port else 1
    expected = f"expected HOST:PORT with a port in {low}..65535" + (
        " (0 picks a free port)" if free_port else ""
    )
    host, colon, port = value.rpartition(":")
    if not colon or not port or value.endswith("]"):
        raise ValueError(f"{expected}, got {value!r} (no port)")
    if not host:
        raise ValueError(f"{expected}, got {value!r} (no host)")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"{expected}, got {value!r} (port {port!r} is not a number)")
    if not low <= int(port) <= 65535:
        raise ValueError(f"{expected}, got {value!r} (port {int(port)} is out of range)")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(f"{expected}, got {value!r} (bad IPv6 address)") from None
        if not host.endswith("]"):
            raise ValueError(f"{expected}, got {value!r} (bad IPv6 address)")
    elif len(host) > 253 or not _HOST.match(host):
        raise ValueError(f"{expected}, got {value!r} (bad host name; IPv6 goes in [brackets])")
    return value
