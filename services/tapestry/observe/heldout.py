"""A contribution's held-out losses, read the same way from the core's dataclass and the
wire's message, whether or not this build carries held-out evaluation at all."""

from __future__ import annotations

from typing import NamedTuple


class HeldOutLosses(NamedTuple):
    """Mean next-token loss on the node's held-out split, of the base the node received
    this round and of the sovereign model it trained from it."""

    base: float
    sovereign: float


def heldout_losses(contribution: object) -> HeldOutLosses | None:
    """``contribution.evaluation``'s losses, or None when the node evaluated nothing.

    Read with ``getattr``: a contribution from a build (or a journal) without the
    ``evaluation`` field has none, and a protobuf message reports an unset field through
    ``HasField`` rather than ``None``.
    """
    evaluation = getattr(contribution, "evaluation", None)
    if evaluation is None:
        return None
    has_field = getattr(contribution, "HasField", None)
    if has_field is not None:
        try:
            if not has_field("evaluation"):
                return None
        except ValueError:  # a message type without the field
            return None
    try:
        return HeldOutLosses(float(evaluation.base_loss), float(evaluation.sovereign_loss))
    except (AttributeError, TypeError, ValueError):
        return None
