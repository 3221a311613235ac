"""``diloco``: outer SGD with (Nesterov) momentum on the pseudo-gradient ``g = −Σ wᵢ·Δᵢ``
(DiLoCo, Douillard et al. 2023: ``θ_old − θ_avg``)::

    m ← μ·m + g;   u = g + μ·m (Nesterov) or m;   base ← base − lr·u

The momentum ``m`` is this strategy's state: it outlives the round, is committed with the
base and comes back with it on a restart or a rollback. ``lr = 1, μ = 0`` is fedavg (up to
float rounding: the pseudo-gradient is summed before it meets the base).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.strategies.base import Integrated, Strategy, WeightedDeltas
from tapestry.training.consortium.strategies.settings import OuterOptimizer
from tapestry.training.consortium.tensors import state_mismatch


class DiLoCo(Strategy):
    """The outer optimizer of the settings' ``outer``; its state is the momentum (``None``:
    zeros, before the first step)."""

    def _combine(
        self,
        base: Mapping[str, torch.Tensor],
        weighted_deltas: WeightedDeltas,
        scales: Sequence[float],
    ) -> Integrated:
        outer = self.settings.outer
        assert outer is not None  # IntegrationStrategy sets it for diloco
        return _outer_step(base, weighted_deltas, scales, outer, self.state)

    def state_problem(
        self, state: Mapping[str, torch.Tensor] | None, base: Mapping[str, torch.Tensor]
    ) -> str | None:
        return momentum_mismatch(state, base)

    def restorable(self, state: ModelState | None) -> ModelState | None:
        return None if state is None else {k: v.detach().clone() for k, v in state.items()}


def _outer_step(
    base: Mapping[str, torch.Tensor],
    weighted_deltas: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
    scales: Sequence[float],
    outer: OuterOptimizer,
    momentum: Mapping[str, torch.Tensor] | None,
) -> Integrated:
    """One outer step per floating tensor. Momentum is kept in at least float32 (a half
    precision momentum would lose the small steps it exists to accumulate)."""
    merged: ModelState = {}
    new_momentum: ModelState = {}
    for name, tensor in base.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            merged[name] = tensor.detach().clone()
            continue
        work = momentum_dtype(tensor.dtype)
        gradient = torch.zeros(tensor.shape, dtype=work)
        for (weight, delta), scale in zip(weighted_deltas, scales, strict=True):
            gradient.sub_(delta[name].to(work), alpha=weight * scale)  # g = −Σ wᵢ·Δᵢ
        previous = momentum.get(name) if momentum is not None else None
        m = gradient.clone() if previous is None else previous.to(work) * outer.momentum + gradient
        update = gradient + outer.momentum * m if outer.nesterov else m
        merged[name] = (tensor.detach().to(work) - outer.lr * update).to(tensor.dtype)
        new_momentum[name] = m
    return Integrated(merged, new_momentum)


def momentum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype diloco keeps a parameter's momentum in (and steps in): at least float32."""
    return torch.promote_types(dtype, torch.float32)


def momentum_mismatch(
    momentum: Mapping[str, torch.Tensor] | None, base: Mapping[str, torch.Tensor]
) -> str | None:
    """Why ``momentum`` cannot be diloco's momentum for ``base`` (per floating entry, one
    finite tensor of its shape in :func:`momentum_dtype`), or ``None`` when it can (or is
    ``None``: zeros)."""
    if momentum is None:
        return None
    expected = {  # shapes and dtypes only: meta tensors hold no data
        name: torch.empty(t.shape, dtype=momentum_dtype(t.dtype), device="meta")
        for name, t in base.items()
        if t.is_floating_point() or t.is_complex()
    }
    return state_mismatch(
        momentum, expected, what="outer momentum", against="the base's floating entries"
    )
