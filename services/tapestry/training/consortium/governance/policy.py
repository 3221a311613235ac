"""Contribution policy: which contributions count, and how much (pure maths, no I/O)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from tapestry.training.consortium.strategies.settings import IntegrationStrategy, strategy_name

# Shares within this of the cap count as at the cap: keeps float noise from re-capping a
# node the previous pass already fixed.
_CAP_TOLERANCE = 1e-12


CONSORTIUM_MAX_NODE_WEIGHT = 0.5
"""The cap a consortium file gets by default (``ContributionPolicy``'s own default, 1.0, is
the proof of concept's): no member takes more than half the weight, so at least two members
must contribute for a round to integrate."""

CONSORTIUM_MAX_DELTA_NORM_RATIO = 10.0
"""The norm bound a consortium file gets by default (``None`` in-process, the proof of
concept's): a delta more than ten times the round's median norm is refused."""


class ContributionWeighting(StrEnum):
    """How accepted contributions are weighted (a str enum: ``"quality"`` or ``"equal"``)."""

    QUALITY = "quality"
    EQUAL = "equal"


@dataclass(frozen=True)
class PolicyDecision:
    """Weights of the accepted nodes (summing to 1) and why each other node was dropped."""

    weights: dict[str, float]
    rejection_reasons: dict[str, str] = field(default_factory=dict)


class ContributionPolicy:
    """Turns quality scores into integration weights.

    - A score counts when it is ``>= quality_floor`` and ``> 0`` (and finite), and, with
      ``max_quality`` (the services use 1.0), not above it: a score out of range is refused
      with a reason rather than normalised, so a member that reports 1e300 cannot take the
      weight of the others. ``None`` (the default) sets no ceiling.
    - With ``max_delta_norm`` (absolute) or ``max_delta_norm_ratio`` (a multiple of the
      median L2 norm of the round's deltas), a contribution whose delta's norm is above the
      bound is refused with a reason before any weight is computed, so one member cannot
      push the base arbitrarily far (or into overflow) in one round. The ratio holds a
      hostile member back only where honest ones are the majority (three members or more).
    - ``"equal"``: each counted node gets ``1/k``.
    - ``"quality"``: scores are normalised; then, repeatedly, every node whose share of the
      remaining mass exceeds ``max_node_weight`` is fixed at exactly the cap and the others
      are renormalised over what is left; finally the weights are renormalised to sum to 1.

    **Infeasible cap**: when ``k * max_node_weight < 1`` no weighting of the ``k``
    counted nodes can both respect the cap and sum to 1. The cap is a governance promise
    ("no jurisdiction steers more than this share"), so it is kept: the round integrates
    nothing, every counted node is rejected with a reason naming the quorum it needs, and
    the base stays bitwise identical. With the default cap of 1.0 this never happens.
    """

    def __init__(
        self,
        quality_floor: float = 0.0,
        max_node_weight: float = 1.0,
        weighting: str | ContributionWeighting = "quality",
        *,
        max_quality: float | None = None,
        max_delta_norm: float | None = None,
        max_delta_norm_ratio: float | None = None,
        strategy: IntegrationStrategy | str | None = None,
    ) -> None:
        checked_quality_floor(quality_floor)
        self.max_quality = checked_max_quality(max_quality)
        self.max_delta_norm = checked_max_delta_norm(max_delta_norm)
        self.max_delta_norm_ratio = checked_max_delta_norm_ratio(max_delta_norm_ratio)
        checked_max_node_weight(max_node_weight)
        if self.max_quality is not None and quality_floor > self.max_quality:
            raise ValueError(
                f"quality_floor {quality_floor} is above max_quality = {self.max_quality}: "
                "every contribution would be refused"
            )
        try:
            self.weighting = ContributionWeighting(weighting)
        except ValueError:
            choices = [w.value for w in ContributionWeighting]
            raise ValueError(f"weighting must be one of {choices}, got {weighting!r}") from None
        self.quality_floor = float(quality_floor)
        self.max_node_weight = float(max_node_weight)
        if strategy is None or isinstance(strategy, str):
            strategy = IntegrationStrategy(strategy_name(strategy or "fedavg"))
        self.strategy = strategy

    @property
    def bounds_delta_norms(self) -> bool:
        """Whether :meth:`decide` needs the deltas' norms."""
        return self.max_delta_norm is not None or self.max_delta_norm_ratio is not None

    @property
    def needs_delta_norms(self) -> bool:
        """Whether a round needs the deltas' norms: to bound them or to clip them."""
        return self.bounds_delta_norms or self.strategy.clip_delta_norm is not None

    def __repr__(self) -> str:
        bounds = "".join(
            f", {name}={value}"
            for name, value in (
                ("max_quality", self.max_quality),
                ("max_delta_norm", self.max_delta_norm),
                ("max_delta_norm_ratio", self.max_delta_norm_ratio),
            )
            if value is not None
        )
        if self.strategy != IntegrationStrategy():
            bounds += f", strategy={self.strategy.describe()!r}"
        return (
            f"ContributionPolicy(quality_floor={self.quality_floor}, "
            f"max_node_weight={self.max_node_weight}, weighting={self.weighting.value!r}"
            f"{bounds})"
        )

    def weights(
        self, scores: Mapping[str, float], delta_norms: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Weights of the accepted nodes, summing to 1; ``{}`` when none is accepted."""
        return self.decide(scores, delta_norms).weights

    def decide(
        self, scores: Mapping[str, float], delta_norms: Mapping[str, float] | None = None
    ) -> PolicyDecision:
        """Weights plus a reason for every node that gets none. ``delta_norms`` (node id ->
        L2 norm of its delta) is required when the policy bounds delta norms."""
        reasons = self._norm_refusals(scores, delta_norms)
        counted: dict[str, float] = {}
        for node_id, score in scores.items():
            score = float(score)
            if node_id in reasons:
                continue
            if not math.isfinite(score):
                reasons[node_id] = f"quality score {score} is not a finite number"
            elif self.max_quality is not None and score > self.max_quality:
                reasons[node_id] = (
                    f"quality score {score:.6g} is above max_quality = {self.max_quality}"
                )
            elif score <= 0:
                reasons[node_id] = f"quality score {score} is not > 0"
            elif score < self.quality_floor:
                reasons[node_id] = f"quality score {score} is below the floor {self.quality_floor}"
            else:
                counted[node_id] = score
        if not counted:
            return PolicyDecision({}, reasons)
        k = len(counted)
        if k * self.max_node_weight < 1:
            need = math.ceil(1 / self.max_node_weight - _CAP_TOLERANCE)
            why = (
                f"cap max_node_weight={self.max_node_weight} cannot hold with {k} accepted "
                f"node(s); it needs at least {need}, so nothing was integrated this round"
            )
            return PolicyDecision({}, reasons | {node_id: why for node_id in counted})
        if self.weighting is ContributionWeighting.EQUAL:
            return PolicyDecision({node_id: 1.0 / k for node_id in counted}, reasons)
        return PolicyDecision(_capped_shares(counted, self.max_node_weight), reasons)

    def _norm_refusals(
        self, scores: Mapping[str, float], norms: Mapping[str, float] | None
    ) -> dict[str, str]:
        """A reason for every node whose delta norm is above the policy's bounds."""
        if not self.bounds_delta_norms:
            return {}
        if norms is None or not set(scores) <= set(norms):
            raise ValueError("this policy bounds delta norms: every node's delta norm is needed")
        finite = [norms[n] for n in scores if math.isfinite(norms[n])]
        median = statistics.median(finite) if finite else math.inf
        reasons: dict[str, str] = {}
        for node_id in scores:
            norm = norms[node_id]
            if not math.isfinite(norm):
                reasons[node_id] = f"delta norm {norm} is not a finite number"
            elif self.max_delta_norm is not None and norm > self.max_delta_norm:
                reasons[node_id] = (
                    f"delta norm {norm:.6g} is above max_delta_norm = {self.max_delta_norm:.6g}"
                )
            elif (
                self.max_delta_norm_ratio is not None and norm > self.max_delta_norm_ratio * median
            ):
                reasons[node_id] = (
                    f"delta norm {norm:.6g} is above max_delta_norm_ratio = "
                    f"{self.max_delta_norm_ratio:.6g} × the round's median {median:.6g}"
                )
        return reasons


# One check per setting, each used by ContributionPolicy and by the configuration file
# (tapestry.config), so a setting is validated in one place with one message.


def checked_quality_floor(value: float) -> float:
    """``quality_floor``: a finite number >= 0."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"quality_floor must be a finite number >= 0, got {value}")
    return float(value)


def checked_max_node_weight(value: float) -> float:
    """``max_node_weight`` (the cap): in ``(0, 1]``."""
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"max_node_weight must be in (0, 1], got {value}")
    return float(value)


def _bound(name: str, least: float) -> Callable[[float | None], float | None]:
    def checked(value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value <= least):
            raise ValueError(f"{name} must be None or a finite number > {least}, got {value}")
        return None if value is None else float(value)

    checked.__doc__ = f"``{name}``: unset, or a finite number > {least:g}."
    return checked


checked_max_quality = _bound("max_quality", 0.0)
checked_max_delta_norm = _bound("max_delta_norm", 0.0)
checked_max_delta_norm_ratio = _bound("max_delta_norm_ratio", 1.0)


def _capped_shares(scores: dict[str, float], cap: float) -> dict[str, float]:
    total = sum(scores.values())
    if not math.isfinite(total):  # huge scores overflow the sum: normalise by the largest
        top = max(scores.values())
        scores = {node_id: score / top for node_id, score in scores.items()}
        total = sum(scores.values())
    shares = {node_id: score / total for node_id, score in scores.items()}
    capped: set[str] = set()
    while True:
        over = [n for n in shares if n not in capped and shares[n] > cap + _CAP_TOLERANCE]
        if not over:
            break
        capped.update(over)
        free = [n for n in shares if n not in capped]
        remaining = 1.0 - cap * len(capped)
        free_total = sum(scores[n] for n in free)
        for n in capped:
            shares[n] = cap
        for n in free:
            shares[n] = remaining * scores[n] / free_total
        if not free:
            break
    total = sum(shares.values())
    return {node_id: share / total for node_id, share in shares.items()}
