"""Next-token loss: one definition for training and for held-out evaluation.

A node trains on its training split and measures, every round, the incoming base and its new
sovereign model on its held-out split (:class:`HeldOutEvaluation`). Both use
:func:`next_token_loss`, so a training loss and a held-out loss are the same quantity: mean
cross-entropy in nats per real target token. Padded positions carry the target
:data:`IGNORE_INDEX` and count for nothing, in training and in evaluation alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tapestry.training.consortium.messages import HeldOutEvaluation

IGNORE_INDEX = -100  # F.cross_entropy's default: targets equal to it add no loss


def next_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy (nats) of ``logits`` (B, T, V) against ``targets`` (B, T), skipping
    targets equal to :data:`IGNORE_INDEX`; ``reduction`` as in ``F.cross_entropy``."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def heldout_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> tuple[float, int]:
    """``(mean loss in nats, target tokens)`` of ``model`` over ``inputs``/``targets``
    (N, T) from :func:`~tapestry.training.consortium.local.node.pad_corpus`.

    Deterministic: eval mode (no dropout), no gradients, rows in order in batches of
    ``batch_size``; each batch's summed loss is added up in double precision and divided
    once by the number of real targets, so the mean does not depend on the batch size
    beyond float32 rounding. The model's train/eval mode is restored afterwards.
    """
    tokens = int((targets != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError("the held-out split has no target token (every sequence is padding)")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                stop = start + batch_size
                logits = model(inputs[start:stop])  # (B, T, V)
                total += float(next_token_loss(logits, targets[start:stop], reduction="sum"))
    finally:
        model.train(was_training)
    return total / tokens, tokens


def perplexity(loss: float) -> float:
    """``exp(loss)``; ``inf`` where that is past a double (which admission then refuses)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def heldout_evaluation(base_loss: float, sovereign_loss: float, tokens: int) -> HeldOutEvaluation:
    """The evaluation of one cycle: the base before training, the sovereign model after."""
    return HeldOutEvaluation(
        base_loss=base_loss,
        base_perplexity=perplexity(base_loss),
        sovereign_loss=sovereign_loss,
        sovereign_perplexity=perplexity(sovereign_loss),
        tokens=tokens,
    )
