"""Pages of a listing (AIP-158): the bounds, opaque page tokens, and pages that fit a message.

- ``page_size`` 0 means :data:`DEFAULT_PAGE_SIZE`; more than :data:`MAX_PAGE_SIZE` is
  treated as the maximum; negative is refused.
- A page also ends early once its items would pass :data:`MAX_PAGE_BYTES` serialized, so a
  page stays under the 8 MiB message limit (``grpc_plumbing.MAX_MESSAGE_BYTES``) whatever
  members put in their metrics. A page always holds at least one item, so a listing always
  moves forward.
- A page token says which listing it belongs to and the position of the last item sent,
  sealed with an HMAC under a key the server draws when it starts: clients must treat it
  as opaque (it is readable base64, but cannot be forged); a garbled, forged or foreign
  token is refused (the message never echoes it), and a token does not outlive the server
  process that issued it (start the listing again). Positions are keys that only grow (a
  round number, a member's place in the consortium file), so a listing that grows between
  pages neither skips nor repeats items.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import Message

from tapestry.limits import MAX_PAGE_BYTES, MAX_PAGE_SIZE, MAX_PAGE_TOKEN_CHARS

DEFAULT_PAGE_SIZE = 50

_MAC_BYTES = 16
_TOKEN_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
_PAYLOAD = re.compile(r"([a-z_]+):(\d{1,18})")
# Room kept in MAX_PAGE_BYTES for next_page_token (field tag, length, characters).
_TOKEN_FIELD_BYTES = 1 + 2 + MAX_PAGE_TOKEN_CHARS

Item = TypeVar("Item", bound=Message)


class InvalidPageRequest(ValueError):
    """``page_size`` or ``page_token`` is not acceptable (INVALID_ARGUMENT)."""


def page_size(requested: int) -> int:
    """The number of items a page may hold for a request's ``page_size``."""
    if requested < 0:
        raise InvalidPageRequest(
            f"page_size must be >= 0 (0 means the default of {DEFAULT_PAGE_SIZE}; "
            f"at most {MAX_PAGE_SIZE} are returned per page), got {requested}"
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class PageTokens:
    """Issues and checks the page tokens of one server's listings."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, listing: str, position: int) -> str:
        """A token for the page of ``listing`` that follows the item at ``position``."""
        payload = f"{listing}:{position}".encode("ascii")
        return base64.urlsafe_b64encode(payload + self._mac(payload)).decode().rstrip("=")

    def position(self, listing: str, token: str) -> int:
        """The position a ``token`` of ``listing`` continues after; 0 for no token."""
        if not token:
            return 0
        if len(token) > MAX_PAGE_TOKEN_CHARS:
            raise InvalidPageRequest(
                f"page_token is longer than {MAX_PAGE_TOKEN_CHARS} characters, so it is not "
                "one this server issued; pass next_page_token back unchanged"
            )
        raw = b""
        if _TOKEN_ALPHABET.fullmatch(token):
            try:
                raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            except (binascii.Error, ValueError):
                raw = b""
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        parsed = _PAYLOAD.fullmatch(payload.decode("ascii", "replace")) if payload else None
        if parsed is None or not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidPageRequest(
                "page_token is not one this server issued (garbled, forged, or from before "
                "a restart); pass next_page_token back unchanged, or leave page_token empty "
                "to start from the first page"
            )
        if parsed[1] != listing:
            raise InvalidPageRequest(
                f"page_token belongs to the {parsed[1]} listing, not to {listing}; "
                "pass each listing its own next_page_token"
            )
        return int(parsed[2])


def take_page(
    entries: Iterable[tuple[int, Item]],
    listing: str,
    requested_size: int,
    page_token: str,
    tokens: PageTokens,
    max_bytes: int = MAX_PAGE_BYTES,
) -> tuple[list[Item], str]:
    """``(items, next_page_token)`` of one page of ``entries``.

    ``entries`` are ``(position, item)`` in ascending position (each > 0), produced lazily
    if need be: only the items up to the end of the page are consumed. The token is empty
    on the last page.
    """
    size = page_size(requested_size)
    after = tokens.position(listing, page_token)
    budget = max_bytes - _TOKEN_FIELD_BYTES
    page: list[Item] = []
    used, last = 0, after
    for position, item in entries:
        if position <= after:
            continue
        cost = _field_bytes(item.ByteSize())
        if len(page) == size or (page and used + cost > budget):
            return page, tokens.issue(listing, last)
        page.append(item)
        used, last = used + cost, position
    return page, ""


def _field_bytes(size: int) -> int:
    """Bytes of one item of a repeated message field numbered below 16 (tag, length, item)."""
    length = 1
    while size >= 0x80 << (7 * (length - 1)):
        length += 1
    return 1 + length + size
