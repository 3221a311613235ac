"""The round messages: frozen dataclasses, re-exported by ``types`` as in the proof of concept."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tapestry.training.consortium as consortium
from tapestry.training.consortium import (
    ConsortiumRoundResult,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
    types,
)

MESSAGES = [
    SovereignModelArtifact,
    SovereignContribution,
    SovereignCycleResult,
    ConsortiumRoundResult,
]


def make_artifact() -> SovereignModelArtifact:
    return SovereignModelArtifact(
        "vn", "Vietnam", "continued_pretraining", {"w": torch.zeros(2)}, {"loss": 1.0}
    )


def make_contribution() -> SovereignContribution:
    return SovereignContribution("vn", 1, {"w": torch.zeros(2)}, 0.9, 12, {"loss": 1.0})


def test_types_re_exports_the_messages_and_model_state() -> None:
    assert types.SovereignModelArtifact is SovereignModelArtifact
    assert types.SovereignContribution is SovereignContribution
    assert types.SovereignCycleResult is SovereignCycleResult
    assert types.ConsortiumRoundResult is ConsortiumRoundResult
    assert types.ModelState is ModelState
    assert ModelState == dict[str, torch.Tensor]
    assert set(types.__all__) == {
        "ConsortiumRoundResult",
        "HeldOutEvaluation",
        "ModelState",
        "SovereignContribution",
        "SovereignCycleResult",
        "SovereignModelArtifact",
    }


def test_the_package_exports_the_proof_of_concepts_names() -> None:
    for name in (
        "TinyCausalModel",
        "SovereignTrainingNode",
        "ContributionPolicy",
        "ContributionWeighting",
        "ConsortiumCoordinator",
        "types",
        *types.__all__,
    ):
        assert name in consortium.__all__
        assert hasattr(consortium, name)


def test_fields_start_with_the_proof_of_concepts_in_its_order() -> None:
    def names(cls: type) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    assert names(SovereignModelArtifact)[:5] == [
        "node_id",
        "jurisdiction",
        "stage",
        "model_state",
        "metrics",
    ]
    assert names(SovereignContribution)[:6] == [
        "node_id",
        "round_num",
        "weight_delta",
        "quality_score",
        "token_count",
        "metrics",
    ]
    assert names(SovereignCycleResult) == ["artifact", "contribution"]
    assert names(ConsortiumRoundResult)[:6] == [
        "round_num",
        "previous_base_state",
        "shared_base_state",
        "accepted_nodes",
        "rejected_nodes",
        "contribution_weights",
    ]


def test_proof_of_concept_positional_construction_still_works() -> None:
    artifact = make_artifact()
    result = ConsortiumRoundResult(1, {}, {}, ["vn"], [], {"vn": 1.0})

    assert (artifact.round_num, artifact.model_state_sha256, artifact.model_state_bytes) == (
        0,
        "",
        0,
    )
    assert (result.rejection_reasons, result.failed_nodes, result.contributions) == ({}, {}, {})


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (make_artifact(), "stage"),
        (make_contribution(), "weight_delta"),
        (SovereignCycleResult(make_artifact(), make_contribution()), "contribution"),
        (ConsortiumRoundResult(1, {}, {}, [], [], {}), "round_num"),
    ],
    ids=[cls.__name__ for cls in MESSAGES],
)
def test_messages_are_frozen(message: object, field: str) -> None:
    assert dataclasses.is_dataclass(message)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(message, field, None)
