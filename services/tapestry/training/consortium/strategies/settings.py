"""Integration strategies: which one a consortium runs and its parameters, checked once.

The policy decides *who* counts and with what weight (floor, cap, weighting, norm bounds);
a strategy decides how the accepted deltas are *combined*:

- ``fedavg`` (default): ``base + Σ wᵢ·Δᵢ`` — the proof of concept's rule, through
  :func:`~tapestry.training.consortium.governance.admission.integrate`, so it stays bit for bit what
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
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from enum import StrEnum

from tapestry.limits import MAX_OUTER_LR

DEFAULT_TRIM_FRACTION = 0.2


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
        checked_outer_lr(self.lr)
        checked_outer_momentum(self.momentum)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be true or false, got {self.nesterov!r}")


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
            trim = checked_trim_fraction(DEFAULT_TRIM_FRACTION if trim is None else trim)
        elif trim is not None:
            raise ValueError(
                f"trim_fraction applies to strategy 'trimmed_mean' only, not {name.value!r}: "
                "remove it or choose 'trimmed_mean'"
            )
        if name is StrategyName.DILOCO:
            outer = outer or OuterOptimizer()
        elif outer is not None:
            raise ValueError(
                f"the outer optimizer's settings apply to strategy 'diloco' only, not "
                f"{name.value!r}: remove them or choose 'diloco'"
            )
        object.__setattr__(self, "trim_fraction", trim)
        object.__setattr__(self, "outer", outer)
        object.__setattr__(self, "clip_delta_norm", checked_clip_delta_norm(self.clip_delta_norm))

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

    def clip_scales(
        self,
        weighted_deltas: Sized,
        delta_norms: Sequence[float] | None,
    ) -> list[float]:
        """Per delta, the factor that brings its norm down to ``clip_delta_norm`` (1: none)."""
        clip = self.clip_delta_norm
        if clip is None:
            return [1.0] * len(weighted_deltas)
        if delta_norms is None or len(delta_norms) != len(weighted_deltas):
            raise ValueError("clip_delta_norm needs every accepted delta's norm (delta_norms)")
        return [clip / norm if norm > clip else 1.0 for norm in delta_norms]


# One check per setting, each used by the dataclasses above and by the configuration file
# (tapestry.config), so a setting is validated in one place with one message.


def checked_trim_fraction(value: float | None) -> float | None:
    """``trim_fraction``: unset, or in ``[0, 0.5)`` (each coordinate keeps at least one
    value)."""
    if value is None:
        return None
    value = float(value)
    if not (math.isfinite(value) and 0 <= value < 0.5):
        raise ValueError(
            f"trim_fraction must be in [0, 0.5) so that each coordinate keeps at least one "
            f"value, got {value}"
        )
    return value


def checked_clip_delta_norm(value: float | None) -> float | None:
    """``clip_delta_norm``: unset, or a finite number > 0."""
    if value is None:
        return None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"clip_delta_norm must be None or a finite number > 0, got {value}")
    return float(value)


def checked_outer_lr(value: float) -> float:
    """diloco's outer learning rate, in ``(0, MAX_OUTER_LR]``."""
    if not (math.isfinite(value) and 0 < value <= MAX_OUTER_LR):
        raise ValueError(f"outer lr must be in (0, {MAX_OUTER_LR}], got {value}")
    return float(value)


def checked_outer_momentum(value: float) -> float:
    """diloco's outer momentum, in ``[0, 1)``."""
    if not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"outer momentum must be in [0, 1), got {value}")
    return float(value)
