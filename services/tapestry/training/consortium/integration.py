"""Checking contributions against the base and integrating them (pure tensor maths)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tapestry.training.consortium.limits import (
    MAX_TOKEN_COUNT,
    evaluation_problem,
    metrics_problem,
    quoted,
)
from tapestry.training.consortium.messages import ModelState, SovereignContribution
from tapestry.training.consortium.tensors import state_mismatch, tensor_blocks

INTEGRATION_BLOCK_ELEMENTS = 1 << 22
"""Integration adds a delta 4 Mi elements (16 MiB of float32) at a time."""


class InvalidContribution(ValueError):
    """A contribution that cannot be integrated; the message says what and where."""


def check_contribution(
    contribution: SovereignContribution,
    base: Mapping[str, torch.Tensor],
    *,
    node_id: str,
    round_num: int,
) -> None:
    """Refuse a contribution that speaks for another node or round, whose numbers are out of
    bounds (:mod:`~tapestry.training.consortium.limits`: token count, metrics, held-out
    evaluation), or whose delta does not match the base key for key (same keys, shapes,
    dtypes) or holds NaN/Inf."""
    if not isinstance(contribution, SovereignContribution):
        raise InvalidContribution(
            f"expected a SovereignContribution, got {type(contribution).__name__}"
        )
    if contribution.node_id != node_id:
        raise InvalidContribution(
            f"contribution claims node_id {quoted(contribution.node_id)} but came from {node_id!r}"
        )
    if contribution.round_num != round_num:
        raise InvalidContribution(
            f"contribution is for round {contribution.round_num}, expected round {round_num}"
        )
    count = contribution.token_count
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TOKEN_COUNT:
        raise InvalidContribution(
            f"token_count must be an integer in [0, MAX_TOKEN_COUNT = {MAX_TOKEN_COUNT}]"
        )
    score = contribution.quality_score
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise InvalidContribution(f"quality_score is a {type(score).__name__}, not a number")
    problem = metrics_problem(contribution.metrics) or evaluation_problem(contribution.evaluation)
    if problem is not None:
        raise InvalidContribution(problem)
    problem = state_mismatch(contribution.weight_delta, base, what="delta", against="the base")
    if problem is not None:
        raise InvalidContribution(problem)


def integrate(
    base: Mapping[str, torch.Tensor],
    weighted_deltas: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
) -> ModelState:
    """``base[k] + Σ wᵢ·Δᵢ[k]`` for every key, adding the deltas in the order given.

    The one implementation used in-process and by the coordinator service, so both give the
    same bits. Non-floating entries (counters, masks) are kept from the base: a weighted
    average of integer deltas has no meaning. The inputs are never modified.

    Each delta is added in blocks of :data:`INTEGRATION_BLOCK_ELEMENTS` (the sum is element
    by element, so the blocks change no bit): a delta spilled to disk is read one block at a
    time (:func:`~tapestry.training.consortium.tensors.tensor_blocks`), so integrating holds
    the base, the new state and one block, however large a tensor.
    """
    merged: ModelState = {}
    for name, tensor in base.items():
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        if out.is_floating_point() or out.is_complex():
            flat = out.view(-1)
            for weight, delta in weighted_deltas:
                for start, block in tensor_blocks(delta, name, INTEGRATION_BLOCK_ELEMENTS):
                    flat[start : start + block.numel()].add_(block, alpha=weight)
        merged[name] = out
    return merged
