"""The errors every layer raises and the edges translate: the CLI prints them as one clear
line, the servicers map them to gRPC status codes (:mod:`tapestry.wire.status`).

Kept free of heavy imports so that light commands such as ``tapestry health`` start fast.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the operator can fix: a configuration, corpus, data directory or launch."""


class WireError(ValueError):
    """A stream or message from a peer that does not decode to what it announces; the
    message says what and where."""


class Busy(RuntimeError):
    """The service is already doing the one thing it does at a time."""


class NotFound(LookupError):
    """The thing asked for does not exist (yet)."""


class ModelBuildError(UserError, ValueError):
    """A spec this process cannot build (a field out of place, a missing optional install);
    the message names the field or the fix."""


def quoted(text: str, limit: int = 80) -> str:
    """``repr`` of a string that came from a peer, cut to ``limit`` characters, so that an
    error message never echoes unbounded input back."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"
