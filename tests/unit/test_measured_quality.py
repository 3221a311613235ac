"""Quality measured, not claimed: each delta scored against a reference update the
coordinator trains itself on a public corpus (FLTrust's direction and size)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from tapestry.training.consortium import ConsortiumCoordinator, ContributionPolicy
from tapestry.training.consortium.governance.measured import QualitySource, reference_scores

from .conftest import CORPORA, MakeNode
from .test_member_validation import Scripted, _loss, _members, rogue_member

REF = {"w": torch.tensor([1.0, 2.0, 2.0]), "b": torch.tensor([0.0])}  # norm 3


def _scaled(factor: float) -> dict[str, torch.Tensor]:
    return {k: v * factor for k, v in REF.items()}


def test_a_delta_scores_by_its_direction_and_size_against_the_reference() -> None:
    scores = reference_scores(
        {
            "same": _scaled(1.0),
            "half": _scaled(0.5),  # smaller: not raised above 1
            "twice": _scaled(2.0),  # larger: scaled down in proportion
            "reversed": _scaled(-9.9),
            "orthogonal": {"w": torch.tensor([2.0, -1.0, 0.0]), "b": torch.tensor([0.0])},
            "zero": _scaled(0.0),
        },
        REF,
    )
    assert scores == pytest.approx(
        {"same": 1.0, "half": 1.0, "twice": 0.5, "reversed": 0.0, "orthogonal": 0.0, "zero": 0.0}
    )


def test_a_delta_whose_sums_overflow_scores_zero_never_nan() -> None:
    huge = {"w": torch.full((3,), 1e300, dtype=torch.float64), "b": torch.zeros(1)}
    scores = reference_scores({"huge": huge}, {k: v.double() for k, v in REF.items()})
    assert scores == {"huge": 0.0}
    assert not any(math.isnan(s) for s in scores.values())


def test_measured_quality_refuses_the_reversed_member_and_keeps_what_each_member_said(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    # The coordinator's reference: the public corpus is every jurisdiction's text.
    public = [line for lines in CORPORA.values() for line in lines]
    reference = make_node("reference", corpus=public, quality_score=1.0, jurisdiction="-")
    honest = _members(make_node)
    rogue = rogue_member(make_node)
    coordinator = ConsortiumCoordinator(
        base_model, ContributionPolicy(max_delta_norm_ratio=10.0), reference=reference
    )
    probe = type(base_model)()

    for _ in range(3):
        result = coordinator.run_round([*honest, rogue])
        assert result.accepted_nodes == ["vn", "ch", "in"]
        assert result.quality_scores["rogue"] == 0.0  # measured
        assert result.contributions["rogue"].quality_score == 1.0  # what it claimed
        assert set(result.quality_sources.values()) == {QualitySource.MEASURED}
        assert list(result.quality_sources) == ["vn", "ch", "in", "rogue"]
        assert all(0 < result.quality_scores[n] <= 1 for n in ("vn", "ch", "in"))
        for node_id in ("vn", "ch", "in"):
            before = _loss(probe, result.previous_base_state, node_id)
            assert _loss(probe, result.shared_base_state, node_id) < before


class _Recording(Scripted):
    """The coordinator's reference node: keeps a copy of every base it is given."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id, [])
        self.bases: list[dict[str, torch.Tensor]] = []

    def run_sovereign_cycle(self, round_num, base_state, *, on_progress=None):
        self.bases.append({k: v.clone() for k, v in base_state.items()})
        return super().run_sovereign_cycle(round_num, base_state, on_progress=on_progress)


class _EditsItsBase(Scripted):
    """A member that shifts the base it was handed in place (toward where it would like
    the reference to start from) before it answers."""

    def run_sovereign_cycle(self, round_num, base_state, *, on_progress=None):
        with torch.no_grad():
            for tensor in base_state.values():
                tensor.add_(100.0)
        return super().run_sovereign_cycle(round_num, base_state, on_progress=on_progress)


def test_the_reference_trains_from_the_round_s_base_even_when_a_member_edited_its_copy() -> None:
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    reference = _Recording("reference")
    coordinator = ConsortiumCoordinator(base, reference=reference)

    coordinator.run_round([_EditsItsBase("rogue", []), Scripted("a", [])])

    assert torch.equal(reference.bases[0]["weight"], torch.zeros(2, 2))


class _BrokenReference(Scripted):
    """A reference node whose update is not one every delta can be scored against."""

    def __init__(self, node_id: str, spoil: str) -> None:
        super().__init__(node_id, [])
        self.spoil = spoil

    def run_sovereign_cycle(self, round_num, base_state, *, on_progress=None):
        result = super().run_sovereign_cycle(round_num, base_state, on_progress=on_progress)
        delta = dict(result.contribution.weight_delta)
        if self.spoil == "nan":
            delta = {k: torch.full_like(v, math.nan) for k, v in delta.items()}
        else:
            delta = {"other": torch.ones(1)}
        contribution = dataclasses.replace(result.contribution, weight_delta=delta)
        return dataclasses.replace(result, contribution=contribution)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("nan", "the reference node's update 'weight' holds NaN or Inf"),
        ("keys", "the reference node's update keys differ from the base"),
    ],
)
def test_a_reference_update_that_cannot_score_fails_the_round_rather_than_every_member(
    spoil: str, message: str
) -> None:
    # A NaN update scored every member 0 (all refused, the round recorded as theirs); one
    # with other keys raised a bare KeyError from the scoring.
    base = nn.Linear(2, 2, bias=False)
    coordinator = ConsortiumCoordinator(base, reference=_BrokenReference("reference", spoil))
    with pytest.raises(ValueError, match=message):
        coordinator.run_round([Scripted("a", []), Scripted("b", [])])
    assert coordinator.round_num == 0


def test_half_precision_deltas_are_scored_in_float64_not_in_their_own_dtype() -> None:
    # 300² = 90,000 is past float16's largest (65,504): summed in float16 the norms would
    # be inf and every delta would score 0.
    reference = {"w": torch.full((4,), 300.0, dtype=torch.float16)}
    scores = reference_scores(
        {"same": {"w": reference["w"].clone()}, "twice": {"w": reference["w"] * 2}}, reference
    )
    assert scores == pytest.approx({"same": 1.0, "twice": 0.5})


def test_every_weighed_score_is_labelled_with_where_it_came_from() -> None:
    base = nn.Linear(2, 2, bias=False)
    members = [Scripted("a", []), Scripted("b", []), Scripted("c", [])]
    assessed = ConsortiumCoordinator(base, assessed_quality={"b": 0.5}).run_round(members)
    assert assessed.quality_scores == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert assessed.quality_sources == {
        "a": QualitySource.SELF_REPORTED,
        "b": QualitySource.ASSESSED,
        "c": QualitySource.SELF_REPORTED,
    }
    # With a reference, every score is measured, the assessment included: none is taken on
    # anyone's word.
    coordinator = ConsortiumCoordinator(
        base, assessed_quality={"b": 0.5}, reference=Scripted("reference", [])
    )
    measured = coordinator.run_round(members)
    assert measured.quality_scores == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert measured.quality_sources == dict.fromkeys("abc", QualitySource.MEASURED)
