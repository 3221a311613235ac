"""Every bound on what a peer, a member, a client or a file may send, named in one place.

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


# -- Configuration files -------------------------------------------------------------------

# A node's cycle may train for hours; a week is past any round we mean to wait for, and a
# bound keeps an `inf` or a typo (3600000) from holding a round open forever.
MAX_NODE_TIMEOUT_S = 7 * 24 * 3600.0
# One member's evaluation of one step toward a round's candidate (member-validated commit):
# the candidate's transfer, once per round, and a pass over a held-out split.
DEFAULT_EVALUATION_TIMEOUT_S = 600.0

# A quorum is a count of members; a consortium is a few institutions, and this bound only
# keeps a typo from passing as a setting.
MAX_MEMBERS = 10_000

# Quality scores live in [0, 1] in a consortium run by the services: a member cannot report
# more, and the policy refuses a contribution that claims more (DESIGN §5).
MAX_QUALITY = 1.0

MAX_MODEL_PARAMS = 1 << 36
"""The most parameters a configured model may hold (~68 G, 256 GiB of float32): past any
one machine a member runs today, so only a typo is refused; a model of this size still
crosses the wire, since tensors travel in chunks of at most ``chunk_bytes``."""

MAX_VOCAB_SIZE = 1 << 20
"""Token ids a configured model may have."""

MAX_HIDDEN_SIZE = 1 << 24
"""A configured model's width; each dimension has a bound of its own, so a typo of a few
digits is refused, and the whole model is bounded by :data:`MAX_MODEL_PARAMS`."""

MAX_LAYERS = 1024
"""Transformer blocks a configured ``gpt`` may have."""

MAX_HEADS = 1024
"""Attention heads per block a configured ``gpt`` may have."""

MAX_CONTEXT_LENGTH = 1 << 20
"""Positions one input of a configured ``gpt`` may hold."""

MIN_CHUNK_BYTES = 1024
"""The smallest chunk tensors may be cut into on the wire (smaller is all overhead)."""

MAX_CHUNK_BYTES = 4 << 20
"""The largest chunk tensors may be cut into on the wire: well under the message bound."""

MAX_LOCAL_EPOCHS = 10_000
"""Passes over its corpus a node's configuration may ask of one cycle."""

MAX_LOCAL_LR = 10.0
"""A local learning rate past this is a typo, not a setting."""

MAX_BATCH_SIZE = 1 << 20
"""Windows per optimizer step a node's configuration may ask for."""

MAX_SEQ_LEN = 1 << 20
"""Byte tokens one training window may hold."""

MAX_HELDOUT_PERCENT = 50
"""The share of its corpus a node may hold out: a node is there to train."""

MAX_SUPERSEDED = 10_000
"""Artifacts of superseded rounds a node's configuration may ask to keep."""

# A transfer over a slow link may take a while; a day is past any we mean to wait for, and a
# bound keeps a typo from letting a stalled caller hold a node for good.
MAX_TRANSFER_TIMEOUT_S = 24 * 3600.0

# Round numbers travel as uint64 (a uint32 field takes a larger number modulo 2**32, so a
# rollback asked for round 2**32 + 2 went to round 2); they stay within int64, which JSON
# readers and signed-integer code hold.
MAX_ROUND_NUM = (1 << 63) - 1


# -- Certificates --------------------------------------------------------------------------

MAX_DAYS = 3650
"""The longest a certificate `tapestry certs` issues may be valid (ten years)."""


# -- Requests ------------------------------------------------------------------------------

# A client's idempotency key (AIP-155): a UUID is 36 characters; the bound keeps the journal
# and the coordinator's table of answered ids small whatever a caller sends.
MAX_REQUEST_ID_CHARS = 64


# -- Messages on the wire ------------------------------------------------------------------

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# HTTP/2 flow-control windows (tapestry.wire.windows): never below gRPC's usual 4 MiB, and
# at most what one process may have in flight toward it across all its streams.
MIN_WINDOW_BYTES = 4 << 20
MAX_WINDOW_BUDGET_MIB = 4096
# What a process lets be in flight toward it by default, all its streams together: three
# members' full windows over the default link (1 Gbit/s, 200 ms: 32 MiB each, 168 MB/s at
# 200 ms, past the link's 125 MB/s), so from three members up the windows share it and the
# coordinator's memory stays flat in their number (benchmarks/RESULTS.md, "flat in N").
DEFAULT_WINDOW_BUDGET_MIB = 96
"""The largest gRPC message either service sends or accepts; tensors travel in chunks far
below it (grpc_plumbing says why each gRPC option is set)."""


# -- Listings ------------------------------------------------------------------------------

MAX_PAGE_SIZE = 1000
"""Items one listing page may hold, whatever page size a caller asks for."""

# Half the message limit: the other half is headroom for the response's own fields.
MAX_PAGE_BYTES = MAX_MESSAGE_BYTES // 2

MAX_PAGE_TOKEN_CHARS = 256
"""A page token a caller may send back (they are sealed; a longer one is not ours)."""


# -- Errors sent back ----------------------------------------------------------------------

# A peer's details are shown, never echoed without bound.
MAX_ERROR_DETAILS_CHARS = 300


# -- What a node says about itself ---------------------------------------------------------

# How much of a name a peer sends is shown or kept (a node id has at most 63 characters).
MAX_PEER_NAME_CHARS = 64
# Calls one member (one certificate identity) may hold open at once on a server; one more is
# RESOURCE_EXHAUSTED (tapestry.pki.call_limits). A node holds its one session and nothing
# more: 2 lets a node that dials again open its new session before the coordinator has
# noticed the old one drop. Operators (and the coordinator, on a node that listens) read
# and run rounds: a few calls at once.
MAX_CALLS_PER_NODE = 2
"""Per lane of its session (``[link] streams``): a node with K lanes may hold 2·K calls."""
MAX_CALLS_PER_MEMBER = 6
# Exchanges a node may say it still holds when it reconnects (one cycle at a time, and a
# few describes); the rest of a longer list is ignored.
MAX_EXCHANGES = 16
# -- Sessions ------------------------------------------------------------------------------

SESSION_CONTROL_MESSAGES = 64
"""Control messages (describes, their answers, exchanges' ends) one side of a session queues
for a peer that has not taken them. A peer that reads takes them at once (they go ahead of
any data); one that does not would have them pile up, a few a round, for as long as its
connection lasts: one more ends the session (RESOURCE_EXHAUSTED)."""

MAX_SESSION_CYCLES = 4
"""Cycles a node runs at once on one session, each on its own thread. An honest coordinator
runs one a round (two while the last one unwinds); a start past the bound is refused at
once (RESOURCE_EXHAUSTED) without a thread, so a coordinator cannot make a node start
threads without end."""

MAX_LINK_STREAMS = 8
DEFAULT_LINK_STREAMS = 1
"""The most connections ("lanes") one member's session may spread its transfers over
(``[link] streams``)."""

LANE_KEY_BYTES = 16
"""The random key a session's welcome gives its node for the session's further lanes."""

LANES_OPEN_S = 10.0
"""How long after its welcome a session's further lanes have to join, or it ends."""

SESSION_HANG_UP_S = 5.0
"""How long the call of a session that has ended (revoked, replaced, refused) may stay open
before the coordinator cancels it. Its handler returns at once, unless it waits in gRPC's
flow control behind a member that does not read: there the session's end cannot reach it,
and it would hold a worker thread and one of the member's calls for as long as the member's
connection lasts."""

MAX_SIGNER_CERTIFICATE_BYTES = 16 * 1024
"""A signature's certificate larger than this is refused unread (the consortium's are under
1 KiB: one P-256 key, a few SANs)."""

MAX_SIGNATURE_BYTES = 256
"""A P-256 ECDSA signature in DER is at most 72 bytes; anything past this bound is not one."""

MAX_BASE_PROOFS = 32
"""The validated commits a cycle's start carries to prove its base (CycleStart.base_proofs):
a node that missed more rounds than this cannot follow the chain and is refused the base
(its operator then sets [trust] or restarts it from the current base)."""

MAX_PROOF_EVALUATIONS = 256
"""The signed evaluations of one base proof a node checks, at most: each costs a signature
check, so a coordinator cannot make a node spend more than MAX_BASE_PROOFS times this."""

MAX_TRUSTED_BASES = 256
"""The bases a node remembers training from ([trust]): a base older than these must be
proved again."""

MAX_RECEIPT_BYTES = 1 << 20
"""A member's receipt (CycleStart.receipts: a signed round record) larger than this,
serialized, is not kept; the coordinator sends at most MAX_BASE_PROOFS of them, at most
MAX_RECEIPTS_BYTES in all (the oldest dropped first)."""

MAX_RECEIPTS_BYTES = 2 << 20
"""The receipts one cycle's start carries, serialized, at most (see MAX_RECEIPT_BYTES)."""
