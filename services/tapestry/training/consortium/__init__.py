"""In-process consortium training core (the proof of concept's public API).

>>> from tapestry.training.consortium import (ConsortiumCoordinator, ContributionPolicy,
...     SovereignTrainingNode, TinyCausalModel)

The gRPC services in :mod:`tapestry.node` and :mod:`tapestry.coordinator` are transport
around exactly this code.
"""

from tapestry.training.consortium import types
from tapestry.training.consortium.coordinator import ConsortiumCoordinator, ConsortiumNode
from tapestry.training.consortium.events import EventSink, RoundEvent, RoundStage
from tapestry.training.consortium.integration import (
    InvalidContribution,
    check_contribution,
    integrate,
)
from tapestry.training.consortium.messages import (
    ConsortiumRoundResult,
    HeldOutEvaluation,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.model import ModelSpec, TinyCausalModel
from tapestry.training.consortium.node import InvalidBase, SovereignTrainingNode, cycle_seed
from tapestry.training.consortium.policy import (
    ContributionPolicy,
    ContributionWeighting,
    PolicyDecision,
)
from tapestry.training.consortium.progress import CyclePhase, CycleProgress
from tapestry.training.consortium.tensors import state_digest

__all__ = [
    "ConsortiumCoordinator",
    "ConsortiumNode",
    "ConsortiumRoundResult",
    "ContributionPolicy",
    "ContributionWeighting",
    "CyclePhase",
    "CycleProgress",
    "EventSink",
    "HeldOutEvaluation",
    "InvalidBase",
    "InvalidContribution",
    "ModelSpec",
    "ModelState",
    "PolicyDecision",
    "RoundEvent",
    "RoundStage",
    "SovereignContribution",
    "SovereignCycleResult",
    "SovereignModelArtifact",
    "SovereignTrainingNode",
    "TinyCausalModel",
    "check_contribution",
    "cycle_seed",
    "integrate",
    "state_digest",
    "types",
]
