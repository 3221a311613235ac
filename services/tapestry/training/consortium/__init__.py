"""In-process consortium training core (the proof of concept's public API).

>>> from tapestry.training.consortium import (ConsortiumCoordinator, ContributionPolicy,
...     SovereignTrainingNode, TinyCausalModel)

The gRPC services in :mod:`tapestry.node` and :mod:`tapestry.coordinator` are transport
around exactly this code. The names below are loaded on first use, so importing a torch-free
part of the core (a model spec, a policy's settings, a bound) never imports torch.

Inside, each room owns one job: :mod:`.round` (the round as a transaction),
:mod:`.governance` (policy, admission, checks), :mod:`.strategies` (how deltas combine),
:mod:`.models` (spec, state, architectures) and :mod:`.local` (a node's training); the
vocabulary they share sits beside them (:mod:`.messages`, :mod:`.progress`, :mod:`.tensors`,
:mod:`.deferred`).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tapestry.training.consortium import types
    from tapestry.training.consortium.governance.admission import (
        InvalidContribution,
        check_contribution,
    )
    from tapestry.training.consortium.governance.policy import (
        ContributionPolicy,
        ContributionWeighting,
        PolicyDecision,
    )
    from tapestry.training.consortium.local.node import (
        InvalidBase,
        SovereignTrainingNode,
        cycle_seed,
    )
    from tapestry.training.consortium.messages import (
        ConsortiumNode,
        HeldOutEvaluation,
        ModelState,
        SovereignContribution,
        SovereignCycleResult,
        SovereignModelArtifact,
    )
    from tapestry.training.consortium.models.spec import ModelSpec
    from tapestry.training.consortium.models.tiny import TinyCausalModel
    from tapestry.training.consortium.progress import CyclePhase, CycleProgress
    from tapestry.training.consortium.round.coordinator import ConsortiumCoordinator
    from tapestry.training.consortium.round.events import EventSink, RoundEvent, RoundStage
    from tapestry.training.consortium.round.result import ConsortiumRoundResult
    from tapestry.training.consortium.strategies.fedavg import integrate
    from tapestry.training.consortium.tensors import state_digest

_HOMES = {
    "ConsortiumCoordinator": "round.coordinator",
    "ConsortiumNode": "messages",
    "ConsortiumRoundResult": "round.result",
    "ContributionPolicy": "governance.policy",
    "ContributionWeighting": "governance.policy",
    "CyclePhase": "progress",
    "CycleProgress": "progress",
    "EventSink": "round.events",
    "HeldOutEvaluation": "messages",
    "InvalidBase": "local.node",
    "InvalidContribution": "governance.admission",
    "ModelSpec": "models.spec",
    "ModelState": "messages",
    "PolicyDecision": "governance.policy",
    "RoundEvent": "round.events",
    "RoundStage": "round.events",
    "SovereignContribution": "messages",
    "SovereignCycleResult": "messages",
    "SovereignModelArtifact": "messages",
    "SovereignTrainingNode": "local.node",
    "TinyCausalModel": "models.tiny",
    "check_contribution": "governance.admission",
    "cycle_seed": "local.node",
    "integrate": "strategies.fedavg",
    "state_digest": "tensors",
}

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


def __getattr__(name: str) -> object:
    if name == "types":
        return import_module(f"{__name__}.types")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
