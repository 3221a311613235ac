"""``median`` and ``trimmed_mean``: base + a coordinate-wise robust statistic of the accepted
deltas. They ignore the weights: a robust statistic must not let the weighting hand one member
the middle. Who is accepted is still the policy's call.

- ``median``: for an even count, the mean of the two middle values;
- ``trimmed_mean``: the mean after dropping the ``k = floor(trim_fraction · n)`` smallest and
  ``k`` largest values.

Work is tensor by tensor across nodes, so deltas spilled to disk are read one tensor at a
time: a tensor's ``n`` deltas are held at once, never whole states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.strategies.base import (
    Integrated,
    Strategy,
    WeightedDeltas,
    scaled,
)
from tapestry.training.consortium.strategies.settings import StrategyName

# floor(trim_fraction · n) must not lose a whole count to float error (0.29 · 100).
_FLOOR_SLACK = 1e-9

_Statistic = Callable[[torch.Tensor], torch.Tensor]
"""A coordinate-wise statistic over dim 0 of values sorted along dim 0."""


class CoordinateWise(Strategy):
    """``median`` or ``trimmed_mean`` (the settings say which)."""

    def _combine(
        self,
        base: Mapping[str, torch.Tensor],
        weighted_deltas: WeightedDeltas,
        scales: Sequence[float],
    ) -> Integrated:
        deltas = [delta for _, delta in weighted_deltas]
        settings = self.settings
        trim = settings.trim_fraction if settings.trim_fraction is not None else 0.0
        robust = _median if settings.name is StrategyName.MEDIAN else _trimmed_mean(trim)
        merged: ModelState = {}
        for name, tensor in base.items():
            out = tensor.detach().clone()
            if deltas and (out.is_floating_point() or out.is_complex()):
                pairs = zip(deltas, scales, strict=True)
                stacked = torch.stack([scaled(d[name], s) for d, s in pairs])  # (n, *shape)
                out.add_(_coordinate_wise(robust, stacked))  # -> shape
            merged[name] = out
        return Integrated(merged)


def _median(ordered: torch.Tensor) -> torch.Tensor:
    """Middle of values sorted along dim 0; for an even count the mean of the two middle."""
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _trimmed_mean(fraction: float) -> _Statistic:
    def trimmed(ordered: torch.Tensor) -> torch.Tensor:
        n = ordered.shape[0]
        k = math.floor(fraction * n + _FLOOR_SLACK)
        return ordered[k : n - k].mean(dim=0)

    return trimmed


def _coordinate_wise(statistic: _Statistic, stacked: torch.Tensor) -> torch.Tensor:
    """``statistic`` over dim 0 of the sorted stack; complex entries take the real and
    imaginary parts apart (complex numbers have no order)."""
    if stacked.is_complex():
        pairs = statistic(torch.view_as_real(stacked).sort(dim=0).values)
        return torch.view_as_complex(pairs.contiguous())
    return statistic(stacked.sort(dim=0).values)
