"""Re-exports of the round messages and ``ModelState`` (the proof of concept's ``types``)."""

from tapestry.training.consortium.messages import (
    HeldOutEvaluation,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.round.result import ConsortiumRoundResult

__all__ = [
    "ConsortiumRoundResult",
    "HeldOutEvaluation",
    "ModelState",
    "SovereignContribution",
    "SovereignCycleResult",
    "SovereignModelArtifact",
]
