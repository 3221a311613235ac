"""``fedavg``: ``base + Σ wᵢ·Δᵢ``, the proof of concept's rule, bit for bit.

:func:`integrate` is the one implementation used in-process and by the coordinator service,
so both give the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.strategies.base import Integrated, Strategy, WeightedDeltas
from tapestry.training.consortium.tensors import tensor_blocks

INTEGRATION_BLOCK_ELEMENTS = 1 << 22
"""Integration adds a delta 4 Mi elements (16 MiB of float32) at a time."""


def integrate(
    base: Mapping[str, torch.Tensor],
    weighted_deltas: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
) -> ModelState:
    """``base[k] + Σ wᵢ·Δᵢ[k]`` for every key, adding the deltas in the order given.

    Non-floating entries (counters, masks) are kept from the base: a weighted
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


class FedAvg(Strategy):
    """``base + Σ wᵢ·sᵢ·Δᵢ`` with each delta's clip factor ``sᵢ`` (1 without clipping)."""

    def _combine(
        self,
        base: Mapping[str, torch.Tensor],
        weighted_deltas: WeightedDeltas,
        scales: Sequence[float],
    ) -> Integrated:
        scaled = [
            (weight if scale == 1.0 else weight * scale, delta)
            for (weight, delta), scale in zip(weighted_deltas, scales, strict=True)
        ]
        return Integrated(integrate(base, scaled))
