"""The bounds on what a member may send with its contribution, named in one place.

A member is untrusted (DESIGN §5): every string, count and mapping it sends is checked
against these before it is weighed, journaled or shown, and a refusal names the bound
without echoing the input back. Tensor bounds are the base's own keys, dtypes and shapes.
"""

from __future__ import annotations

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


MAX_HELDOUT_LOSS = 700.0
"""Nats per token a held-out loss may be: far past any model worth weighing (a uniform guess
over 256 bytes is 5.5), and low enough that its perplexity ``exp(loss)`` is a finite double
(which ends near 709.8)."""

MAX_PROGRESS_MESSAGES = 1000
"""Progress messages one node may send in one cycle; one more fails the node. A node's own
throttle keeps an honest node well below it however long it trains: at most
:data:`NODE_PROGRESS_REPORTS` training reports (spread over its steps), its last step and
its base received."""

NODE_PROGRESS_REPORTS = 500
"""Training reports a node service sends at most per cycle (besides its last step)."""

MAX_PROGRESS_MESSAGE_BYTES = 256
"""Encoded size of one progress message: a few numbers take under 64 bytes; more is padding
(unknown fields) a member has no business sending."""

MAX_TRAINING_STEPS = 2**53
"""Optimiser steps a node may say a cycle takes: beyond any cycle, and exact in a double."""

MAX_PROGRESS_LOSS = 700.0
"""Nats per token a reported training loss may be (as :data:`MAX_HELDOUT_LOSS`)."""

MAX_TENSOR_COUNT = 2**32 - 1
"""Tensors a progress report may say a state holds (the wire's uint32)."""

PERPLEXITY_RELATIVE_TOLERANCE = 1e-9
"""How far a reported perplexity may be from ``exp`` of its loss (rounding, not a choice)."""

MAX_OUTER_LR = 10.0
"""An outer learning rate (diloco) past this is a typo, not a setting (DiLoCo uses 0.7)."""
