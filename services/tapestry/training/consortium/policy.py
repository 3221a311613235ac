"""Contribution policy: which contributions count, and how much (pure maths, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

# Shares within this of the cap count as at the cap: keeps float noise from re-capping a
# node the previous pass already fixed.
_CAP_TOLERANCE = 1e-12


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

    - A score counts when it is ``>= quality_floor`` and ``> 0`` (and finite).
    - ``"equal"``: each counted node gets ``1/k``.
    - ``"quality"``: scores are normalised; then, repeatedly, every node whose share of the
      remaining mass exceeds ``max_node_weight`` is fixed at exactly the cap and the others
      are renormalised over what is left; finally the weights are renormalised to sum to 1.

    **Infeasible cap** (a documented change from the proof of concept, which silently gave
    nodes more than the cap): when ``k * max_node_weight < 1`` no weighting of the ``k``
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
    ) -> None:
        if not math.isfinite(quality_floor) or quality_floor < 0:
            raise ValueError(f"quality_floor must be a finite number >= 0, got {quality_floor}")
        if not math.isfinite(max_node_weight) or not 0 < max_node_weight <= 1:
            raise ValueError(f"max_node_weight must be in (0, 1], got {max_node_weight}")
        try:
            self.weighting = ContributionWeighting(weighting)
        except ValueError:
            choices = [w.value for w in ContributionWeighting]
            raise ValueError(f"weighting must be one of {choices}, got {weighting!r}") from None
        self.quality_floor = float(quality_floor)
        self.max_node_weight = float(max_node_weight)

    def __repr__(self) -> str:
        return (
            f"ContributionPolicy(quality_floor={self.quality_floor}, "
            f"max_node_weight={self.max_node_weight}, weighting={self.weighting.value!r})"
        )

    def weights(self, scores: Mapping[str, float]) -> dict[str, float]:
        """Weights of the accepted nodes, summing to 1; ``{}`` when none is accepted."""
        return self.decide(scores).weights

    def decide(self, scores: Mapping[str, float]) -> PolicyDecision:
        """Weights plus a reason for every node that gets none."""
        reasons: dict[str, str] = {}
        counted: dict[str, float] = {}
        for node_id, score in scores.items():
            score = float(score)
            if not math.isfinite(score):
                reasons[node_id] = f"quality score {score} is not a finite number"
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


def _capped_shares(scores: dict[str, float], cap: float) -> dict[str, float]:
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
