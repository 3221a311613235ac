"""Re-exports of the round messages and ``ModelState`` (the proof of concept's ``types``)."""

from tapestry.training.consortium.messages import (
    ConsortiumRoundResult,
    HeldOutEvaluation,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)

__all__ = [
    "ConsortiumRoundResult",
    "HeldOutEvaluation",
    "ModelState",
    "SovereignContribution",
    "SovereignCycleResult",
    "SovereignModelArtifact",
]
