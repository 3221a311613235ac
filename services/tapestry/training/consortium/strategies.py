"""Integration strategies: how the accepted deltas become the next base (pure tensor maths).

The policy decides *who* counts and with what weight (floor, cap, weighting, norm bounds);
a strategy decides how the accepted deltas are *combined*:

- ``fedavg`` (default): ``base + Σ wᵢ·Δᵢ`` — the proof of concept's rule, through
  :func:`~tapestry.training.consortium.integration.integrate`, so it stays bit for bit what
  it always was.
- ``diloco``: outer SGD with (Nesterov) momentum on the pseudo-gradient
  ``g = −Σ wᵢ·Δᵢ`` (DiLoCo, Douillard et al. 2023: ``θ_old − θ_avg``)::

      m ← μ·m + g;   u = g + μ·m (Nesterov) or m;   base ← base − lr·u

  The momentum ``m`` is state that outlives the round; ``lr = 1, μ = 0`` is fedavg (up to
  float rounding: the pseudo-gradient is summed before it meets the base).
- ``median``: base + the coordinate-wise median of the accepted deltas; for an even count,
  the mean of the two middle values.
- ``trimmed_mean``: base + the coordinate-wise mean after dropping the
  ``k = floor(trim_fraction · n)`` smallest and ``k`` largest values.

``median`` and ``trimmed_mean`` ignore the weights: a robust statistic must not let the
weighting hand one member the middle. Who is accepted is still the policy's call.

``clip_delta_norm`` (any strategy) first scales each accepted delta whose L2 norm (all its
floating entries as one vector) is above the bound down to exactly that norm.

Non-floating entries (counters, masks) are kept from the base, as :func:`integrate` does.
Work is tensor by tensor across nodes, so deltas spilled to disk are read one tensor at a
time; the robust strategies hold one tensor's ``n`` deltas at once, never whole states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from tapestry.training.consortium.integration import integrate
from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.tensors import state_mismatch

DEFAULT_TRIM_FRACTION = 0.2
# An outer learning rate past this is a typo, not a setting (DiLoCo uses 0.7).
MAX_OUTER_LR = 10.0
# floor(trim_fraction · n) must not lose a whole count to float error (0.29 · 100).
_FLOOR_SLACK = 1e-9

_Statistic = Callable[[torch.Tensor], torch.Tensor]
"""A coordinate-wise statistic over dim 0 of values sorted along dim 0."""


class StrategyName(StrEnum):
    """The integration strategies (a str enum: ``"fedavg"``, ``"diloco"``, ...)."""

    FEDAVG = "fedavg"
    DILOCO = "diloco"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"


def strategy_name(value: str) -> StrategyName:
    """``value`` as a :class:`StrategyName`; an unknown name is a ``ValueError`` that lists
    the known ones."""
    try:
        return StrategyName(value)
    except ValueError:
        choices = [s.value for s in StrategyName]
        raise ValueError(f"strategy must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True)
class OuterOptimizer:
    """DiLoCo's outer optimizer: SGD with momentum ``momentum`` in ``[0, 1)`` and learning
    rate ``lr`` in ``(0, MAX_OUTER_LR]``; Nesterov's look-ahead when ``nesterov``."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and 0 < self.lr <= MAX_OUTER_LR):
            raise ValueError(f"outer lr must be in (0, {MAX_OUTER_LR}], got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")


@dataclass(frozen=True)
class Integrated:
    """A strategy's output: the new base and, for ``diloco``, the momentum after the step
    (``None`` otherwise)."""

    state: ModelState
    momentum: ModelState | None = None


@dataclass(frozen=True)
class IntegrationStrategy:
    """Which strategy, with its parameters; invalid combinations are a ``ValueError``.

    ``trim_fraction`` belongs to ``trimmed_mean`` only (default
    :data:`DEFAULT_TRIM_FRACTION`; in ``[0, 0.5)``, so at least one value per coordinate
    is left whatever the count); ``outer`` to ``diloco`` only (default
    :class:`OuterOptimizer`'s). ``clip_delta_norm`` (``> 0``) goes with any strategy.
    """

    name: StrategyName = StrategyName.FEDAVG
    trim_fraction: float | None = None
    clip_delta_norm: float | None = None
    outer: OuterOptimizer | None = field(default=None)

    def __post_init__(self) -> None:
        name = strategy_name(self.name)
        object.__setattr__(self, "name", name)
        trim, outer = self.trim_fraction, self.outer
        if name is StrategyName.TRIMMED_MEAN:
            trim = DEFAULT_TRIM_FRACTION if trim is None else float(trim)
            if not (math.isfinite(trim) and 0 <= trim < 0.5):
                raise ValueError(
                    f"trim_fraction must be in [0, 0.5) so that each coordinate keeps at "
                    f"least one value, got {trim}"
                )
        elif trim is not None:
            raise ValueError(f"trim_fraction is for strategy 'trimmed_mean', not {name.value!r}")
        if name is StrategyName.DILOCO:
            outer = outer or OuterOptimizer()
        elif outer is not None:
            raise ValueError(f"outer optimizer settings are for 'diloco', not {name.value!r}")
        clip = self.clip_delta_norm
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip_delta_norm must be None or a finite number > 0, got {clip}")
        object.__setattr__(self, "trim_fraction", trim)
        object.__setattr__(self, "outer", outer)
        object.__setattr__(self, "clip_delta_norm", None if clip is None else float(clip))

    def describe(self) -> str:
        """Short, for logs and reports: ``"fedavg"``, ``"diloco lr 0.7 μ 0.9 nesterov"``."""
        text = self.name.value
        if self.outer is not None:
            text += f" lr {self.outer.lr:g} μ {self.outer.momentum:g}"
            text += " nesterov" if self.outer.nesterov else ""
        if self.trim_fraction is not None:
            text += f" trim {self.trim_fraction:g}"
        if self.clip_delta_norm is not None:
            text += f", clip {self.clip_delta_norm:g}"
        return text

    def apply(
        self,
        base: Mapping[str, torch.Tensor],
        weighted_deltas: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
        *,
        delta_norms: Sequence[float] | None = None,
        momentum: Mapping[str, torch.Tensor] | None = None,
    ) -> Integrated:
        """Combine the accepted ``(weight, delta)`` pairs into a new base (inputs are never
        modified). ``delta_norms`` (aligned with the deltas) is required with
        ``clip_delta_norm``; ``momentum`` is diloco's state from the last round (``None``:
        zeros, the first round)."""
        scales = self._clip_scales(weighted_deltas, delta_norms)
        if self.name is StrategyName.FEDAVG:
            scaled = [
                (weight if scale == 1.0 else weight * scale, delta)
                for (weight, delta), scale in zip(weighted_deltas, scales, strict=True)
            ]
            return Integrated(integrate(base, scaled))
        if self.name is StrategyName.DILOCO:
            assert self.outer is not None  # set by __post_init__
            return _diloco(base, weighted_deltas, scales, self.outer, momentum)
        deltas = [delta for _, delta in weighted_deltas]
        trim = self.trim_fraction if self.trim_fraction is not None else 0.0
        robust: _Statistic = _median if self.name is StrategyName.MEDIAN else _trimmed_mean(trim)
        merged: ModelState = {}
        for name, tensor in base.items():
            out = tensor.detach().clone()
            if deltas and (out.is_floating_point() or out.is_complex()):
                pairs = zip(deltas, scales, strict=True)
                stacked = torch.stack([_scaled(d[name], s) for d, s in pairs])  # (n, *shape)
                out.add_(_coordinate_wise(robust, stacked))  # -> shape
            merged[name] = out
        return Integrated(merged)

    def _clip_scales(
        self,
        weighted_deltas: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
        delta_norms: Sequence[float] | None,
    ) -> list[float]:
        """Per delta, the factor that brings its norm down to ``clip_delta_norm`` (1: none)."""
        clip = self.clip_delta_norm
        if clip is None:
            return [1.0] * len(weighted_deltas)
        if delta_norms is None or len(delta_norms) != len(weighted_deltas):
            raise ValueError("clip_delta_norm needs every accepted delta's norm (delta_norms)")
        return [clip / norm if norm > clip else 1.0 for norm in delta_norms]


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    return tensor if scale == 1.0 else tensor * scale


def _diloco(
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
