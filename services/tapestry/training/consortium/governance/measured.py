"""Quality measured, not claimed: each delta's score from what it does, against a reference
update the consortium trusts (in the spirit of FLTrust, arXiv 2012.13995).

The coordinator trains the round's base on a public reference corpus that the consortium
agreed on and that it holds itself. That gives the reference update. A member's delta then
scores by its direction and size against that update:

    score = max(0, cos(delta, reference)) x min(1, |reference| / |delta|)

- A delta that points away from the reference (the reversed member: its honest delta times
  -9.9) scores 0, so the policy does not count it.
- One far larger than the reference is scaled down in proportion.
- No delta scores above 1, so a member gains nothing by claiming.

The scores replace the members' self-reported quality for the round's weighting. The
results keep both: ``quality_scores`` holds what was weighed, each contribution's
``quality_score`` what the member said, and ``quality_sources`` where each weighed score
came from (:class:`QualitySource`), so no result passes a claim off as a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum

import torch

from tapestry.training.consortium.tensors import state_norm

State = Mapping[str, torch.Tensor]


class QualitySource(StrEnum):
    """Where the quality score a round weighed a member by came from."""

    SELF_REPORTED = "self_reported"
    """What the member said about itself (its contribution's ``quality_score``)."""
    ASSESSED = "assessed"
    """The consortium's own assessment of the member (the coordinator's
    ``assessed_quality``: a consortium file's ``[[nodes]] quality_score``)."""
    MEASURED = "measured"
    """Its delta's direction and size against the reference update (:func:`reference_scores`)."""
    EVALUATED = "evaluated"
    """What its contribution does to the other members' held-out losses, measured by their
    evaluations in the validation phase
    (:func:`~tapestry.training.consortium.governance.acceptance.evaluated_scores`)."""


def reference_scores(deltas: Mapping[str, State], reference: State) -> dict[str, float]:
    """Each member's score in [0, 1] against ``reference`` (every delta holds the
    reference's keys and shapes: the round checked them against the base). Sums run in
    float64; a zero delta or reference, or one whose sums overflow even float64, scores 0
    (never a NaN that a comparison would let through)."""
    ref_norm = state_norm(reference)
    scores = {}
    for node_id, delta in deltas.items():
        norm = state_norm(delta)  # known without a pass where measured on arrival
        dot = sum(
            float(torch.sum(delta[name].double() * reference[name].double())) for name in reference
        )
        finite = all(math.isfinite(x) for x in (norm, ref_norm, dot))
        if not finite or norm == 0.0 or ref_norm == 0.0:
            scores[node_id] = 0.0
            continue
        cosine = dot / (norm * ref_norm)
        scores[node_id] = max(0.0, min(1.0, cosine)) * min(1.0, ref_norm / norm)
    return scores
