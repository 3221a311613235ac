"""Hypothesis profiles for the property tests.

``ci`` (the default) is derandomized and small enough for the normal test run;
``HYPOTHESIS_PROFILE=thorough`` runs many more examples, for a longer run by hand.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=60,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """``n`` examples in the normal run, twenty times as many in the thorough profile."""
    return n * 20 if PROFILE == "thorough" else n


# A refusal says what was wrong without echoing unbounded input (DESIGN.md §5).
MAX_MESSAGE_CHARS = 1000
