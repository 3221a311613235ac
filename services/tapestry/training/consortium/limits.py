"""The bounds on what a member may send with its contribution, named in one place.

A member is untrusted (DESIGN §5): every string, count and mapping it sends is checked
against these before it is weighed, journaled or shown, and a refusal names the bound
without echoing the input back. Tensor bounds are the base's own keys, dtypes and shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tapestry.errors import quoted

__all__ = [
    "MAX_METRICS",
    "MAX_NAME_CHARS",
    "MAX_REASON_CHARS",
    "MAX_STATE_BYTES",
    "MAX_TOKEN_COUNT",
    "bounded_text",
    "metrics_problem",
    "name_problem",
    "quoted",
]

MAX_METRICS = 32
"""Metrics per contribution or artifact (``loss`` and a few more)."""

MAX_NAME_CHARS = 128
"""Node ids, jurisdictions, stages and metric names."""

MAX_REASON_CHARS = 1000
"""A failure reason kept in the round's result and journal (a node's error text included)."""

MAX_TOKEN_COUNT = 2**53
"""Tokens a node may claim: beyond any corpus, and exact in a double."""

MAX_STATE_BYTES = 2**50
"""Bytes a node may claim its retained model holds (1 PiB)."""


def bounded_text(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (cut from {len(text)} characters)"


def metrics_problem(metrics: object) -> str | None:
    """Why ``metrics`` is not a small mapping of short names to finite numbers, or None."""
    if not isinstance(metrics, Mapping):
        return f"metrics must be a mapping, got {type(metrics).__name__}"
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, more than MAX_METRICS = {MAX_METRICS}"
    for name, value in metrics.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            return f"a metric name is not a string of 1 to MAX_NAME_CHARS = {MAX_NAME_CHARS}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric {name!r} is a {type(value).__name__}, not a number"
        if not math.isfinite(value):
            return f"metric {name!r} is {value}, not a finite number"
    return None


def name_problem(field: str, value: object) -> str | None:
    """Why ``value`` is not a string of 1 to :data:`MAX_NAME_CHARS` characters, or None."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        return f"{field} must be a string of 1 to MAX_NAME_CHARS = {MAX_NAME_CHARS} characters"
    return None
