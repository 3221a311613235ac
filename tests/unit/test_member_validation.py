"""Member-validated commit in the core: off unless asked (the proof of concept's rounds are
unchanged); on, the members that contributed evaluate the candidate and the round commits
it, a shorter step toward it, or nothing, as the acceptance rule says."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    SovereignTrainingNode,
)
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy
from tapestry.training.consortium.local.evaluation import heldout_loss
from tapestry.training.consortium.local.node import pad_corpus
from tapestry.training.consortium.messages import MemberEvaluation, SovereignCycleResult
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.tensors import clone_state, state_digest
from tapestry.wire.codec import round_result_to_proto

from .conftest import CORPORA, MakeNode, encode

HELDOUT = {
    "vn": [encode("Chợ nổi Cái Răng họp từ sáng sớm."), encode("Lúa nổi trên đồng.")],
    "ch": [encode("Der Zug nach Chur fährt um acht."), encode("Le train part.")],
    "in": [encode("बारिश आज रात होगी।"), encode("दिल्ली में बारिश।")],
}


def _members(make_node: MakeNode) -> list[SovereignTrainingNode]:
    return [make_node(n, heldout_corpus=HELDOUT[n]) for n in ("vn", "ch", "in")]


class Reversed:
    """The issue's hostile member: trains honestly on Vietnamese, sends its delta times
    -9.9 with quality 1.0, and flatters every candidate in its evaluation."""

    def __init__(self, node: SovereignTrainingNode) -> None:
        self.node = node
        self.node_id = node.node_id

    def run_sovereign_cycle(
        self, round_num: int, base_state: Mapping[str, torch.Tensor], *, on_progress=None
    ) -> SovereignCycleResult:
        result = self.node.run_sovereign_cycle(round_num, base_state, on_progress=on_progress)
        delta = {k: v * -9.9 for k, v in result.contribution.weight_delta.items()}
        contribution = dataclasses.replace(
            result.contribution, weight_delta=delta, quality_score=1.0
        )
        return dataclasses.replace(result, contribution=contribution)

    def evaluate_candidate(
        self, round_num: int, candidate_state: Mapping[str, torch.Tensor]
    ) -> MemberEvaluation | None:
        honest = self.node.evaluate_candidate(round_num, candidate_state)
        assert honest is not None
        return dataclasses.replace(honest, candidate_loss=honest.base_loss * 0.5)


def rogue_member(make_node: MakeNode) -> Reversed:
    """The reversed member, training on Vietnamese text and claiming quality 1.0."""
    node = make_node(
        "rogue",
        corpus=CORPORA["vn"],
        quality_score=1.0,
        jurisdiction="Rogue",
        heldout_corpus=HELDOUT["vn"],
    )
    return Reversed(node)


def _loss(model: nn.Module, state: Mapping[str, torch.Tensor], node_id: str) -> float:
    model.load_state_dict(state)
    inputs, targets = pad_corpus(HELDOUT[node_id])
    return heldout_loss(model, inputs, targets, 2)[0]


def test_validation_is_off_unless_asked_and_then_an_accepted_round_is_the_same_bits(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    plain = ConsortiumCoordinator(base_model).run_round(_members(make_node))
    validated = ConsortiumCoordinator(base_model, acceptance=AcceptancePolicy()).run_round(
        _members(make_node)
    )

    assert plain.validation is None
    assert validated.validation is not None
    assert validated.validation.scale == 1.0
    assert validated.shared_base_sha256 == plain.shared_base_sha256
    (attempt,) = validated.validation.attempts
    assert [e.node_id for e in attempt.evaluations] == ["vn", "ch", "in"]
    assert all(e.change <= 0.01 for e in attempt.evaluations)


def test_the_reversed_member_is_contained_the_honest_held_out_loss_never_rises(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    def consortium(acceptance: AcceptancePolicy | None) -> list[tuple[str, float, float]]:
        honest = _members(make_node)
        rogue = rogue_member(make_node)
        coordinator = ConsortiumCoordinator(
            base_model, ContributionPolicy(max_delta_norm_ratio=10.0), acceptance=acceptance
        )
        probe = type(base_model)()
        rises = []
        for _ in range(3):
            result = coordinator.run_round([*honest, rogue])
            for node_id in ("vn", "ch", "in"):
                before = _loss(probe, result.previous_base_state, node_id)
                after = _loss(probe, result.shared_base_state, node_id)
                rises.append((node_id, before, after))
        return rises

    unvalidated = consortium(None)
    validated = consortium(AcceptancePolicy())

    # Without validation the rogue drags some honest member's held-out loss up...
    assert max(after - before for _, before, after in unvalidated) > 0.01
    # ...with it, no honest member's loss rises past the tolerance in any round.
    assert max(after - before for _, before, after in validated) <= 0.01


class Scripted:
    """A member whose delta is +1 everywhere and whose evaluations follow a script, one
    change per step asked (it raises past the script: never asked more)."""

    def __init__(self, node_id: str, changes: list[float]) -> None:
        self.node_id = node_id
        self.changes = list(changes)
        self.asked: list[float] = []

    def run_sovereign_cycle(self, round_num, base_state, *, on_progress=None):
        from tapestry.training.consortium.messages import (
            SovereignContribution,
            SovereignModelArtifact,
        )

        delta = {k: torch.ones_like(v) for k, v in base_state.items()}
        return SovereignCycleResult(
            artifact=SovereignModelArtifact(self.node_id, self.node_id, "cpt", {}, {}, round_num),
            contribution=SovereignContribution(self.node_id, round_num, delta, 1.0, 1, {}),
        )

    def evaluate_candidate(self, round_num, candidate_state) -> MemberEvaluation:
        change = self.changes.pop(0)
        step = next(iter(candidate_state.values())).flatten()[0].item()
        self.asked.append(step)
        return MemberEvaluation(self.node_id, 3.0, 3.0 + change)


def test_a_rejected_candidate_commits_the_first_shorter_step_the_members_accept() -> None:
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    members = [Scripted("a", [0.5, -0.1]), Scripted("b", [0.3, 0.0]), Scripted("c", [0, 0])]
    result = ConsortiumCoordinator(base, acceptance=AcceptancePolicy()).run_round(members)

    assert result.validation is not None and result.validation.scale == 0.5
    assert [m.asked for m in members] == [[1.0, 0.5]] * 3  # the full step, then half of it
    assert torch.equal(result.shared_base_state["weight"], torch.full((2, 2), 0.5))
    assert result.accepted_nodes == ["a", "b", "c"]


def test_a_candidate_the_members_never_accept_leaves_the_base_bitwise_and_says_why() -> None:
    base = nn.Linear(2, 2, bias=False)
    before = clone_state(model_state(base))
    members = [Scripted("a", [0.5] * 4), Scripted("b", [0.3] * 4), Scripted("c", [0] * 4)]
    coordinator = ConsortiumCoordinator(base, acceptance=AcceptancePolicy())

    result = coordinator.run_round(members)

    assert result.validation is not None and result.validation.scale is None
    assert len(result.validation.attempts) == 4  # 1, 1/2, 1/4, 1/8
    assert result.accepted_nodes == [] and result.contribution_weights == {}
    assert sorted(result.rejected_nodes) == ["a", "b", "c"]
    assert result.rejection_reasons["a"].startswith(
        "the members did not accept the candidate: not committed: held-out loss rose past "
        "0.01: a +0.5, b +0.3"
    )
    assert result.shared_base_sha256 == result.previous_base_sha256 == state_digest(before)
    assert torch.equal(model_state(coordinator.base_model)["weight"], before["weight"])
    assert coordinator.round_num == 1  # a round, recorded, that changed nothing
    wire = round_result_to_proto(result).validation
    assert (wire.rule, wire.tolerance, wire.max_halvings) == ("no_regression", 0.01, 3)
    assert not wire.HasField("committed_scale")
    assert [a.scale for a in wire.attempts] == [1.0, 0.5, 0.25, 0.125]
    assert [(e.node_id, e.candidate_loss) for e in wire.attempts[0].evaluations] == [
        ("a", 3.5),
        ("b", 3.3),
        ("c", 3.0),
    ]


def test_a_lone_objector_is_committed_over_and_recorded() -> None:
    base = nn.Linear(2, 2, bias=False)
    members = [Scripted("a", [9.0] * 4), Scripted("b", [-0.1] * 4), Scripted("c", [-0.2] * 4)]
    result = ConsortiumCoordinator(base, acceptance=AcceptancePolicy()).run_round(members)

    assert result.validation is not None
    assert (result.validation.scale, result.validation.committed_over) == (1.0, ("a",))
    assert list(round_result_to_proto(result).validation.committed_over) == ["a"]


def test_members_that_cannot_evaluate_do_not_count_and_a_quorum_is_needed() -> None:
    base = nn.Linear(2, 2, bias=False)
    before = state_digest(model_state(base))

    class Broken(Scripted):
        def evaluate_candidate(self, round_num, candidate_state):
            raise RuntimeError("held-out split unreadable")

    members = [Scripted("a", [-0.1] * 4), Broken("b", []), Broken("c", [])]
    result = ConsortiumCoordinator(base, acceptance=AcceptancePolicy(), min_nodes=2).run_round(
        members
    )

    assert result.validation is not None and result.validation.scale is None
    assert result.validation.attempts[0].verdict.reason == (
        "1 members evaluated the candidate; at least 2 must"
    )
    assert result.shared_base_sha256 == before


@pytest.mark.parametrize("impostor", ["b", "nobody"])
def test_an_evaluation_in_another_members_name_is_not_counted(impostor: str) -> None:
    base = nn.Linear(2, 2, bias=False)

    class Impostor(Scripted):
        def evaluate_candidate(self, round_num, candidate_state):
            return MemberEvaluation(impostor, 3.0, 9.0)

    members = [Scripted("a", [-0.1] * 4), Scripted("b", [-0.1] * 4), Impostor("c", [])]
    result = ConsortiumCoordinator(base, acceptance=AcceptancePolicy()).run_round(members)

    assert result.validation is not None and result.validation.scale == 1.0
    assert [e.node_id for e in result.validation.attempts[0].evaluations] == ["a", "b"]


def test_a_shorter_step_keeps_each_tensors_dtype_and_leaves_integer_buffers_alone() -> None:
    from tapestry.training.consortium.round.validation import step

    base = {"w": torch.zeros(2, dtype=torch.bfloat16), "ids": torch.arange(3)}
    candidate = {"w": torch.ones(2, dtype=torch.bfloat16), "ids": torch.arange(3)}
    half = step(base, candidate, 0.5)
    assert half["w"].dtype is torch.bfloat16 and torch.equal(half["w"], torch.full((2,), 0.5))
    assert half["ids"].dtype is torch.int64 and half["ids"] is candidate["ids"]
    assert step(base, candidate, 1.0) is candidate


class Vandal(Scripted):
    """A member that edits the candidate it was handed in place (+100 everywhere) and
    flatters it: what it edited must be neither what is committed nor what others judge."""

    def evaluate_candidate(self, round_num, candidate_state):
        evaluation = super().evaluate_candidate(round_num, candidate_state)
        with torch.no_grad():
            for tensor in candidate_state.values():
                tensor.add_(100.0)
        return evaluation


def test_a_member_that_edits_the_candidate_in_place_changes_neither_the_base_nor_the_others_view() -> (
    None
):
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    members = [Vandal("a", [-0.1]), Scripted("b", [-0.1]), Scripted("c", [-0.1])]
    result = ConsortiumCoordinator(base, acceptance=AcceptancePolicy()).run_round(members)

    assert result.validation is not None and result.validation.scale == 1.0
    assert [m.asked for m in members] == [[1.0]] * 3  # b and c saw the candidate as it is
    assert torch.equal(result.shared_base_state["weight"], torch.ones(2, 2))  # 0 + mean(+1)
    # the member whose evaluation edited what it judged is not counted
    assert [e.node_id for e in result.validation.attempts[0].evaluations] == ["b", "c"]


class Judge:
    """A member whose delta is ``value`` everywhere and who judges a candidate by how far its
    first weight is from ``target``, against how far the base's is. ``flatter``: it says
    every candidate is better (the hostile member's evaluation)."""

    def __init__(self, node_id: str, value: float, target: float, flatter: bool = False) -> None:
        self.node_id, self.value, self.target, self.flatter = node_id, value, target, flatter
        self.judged: list[float] = []
        self.base = 0.0

    def run_sovereign_cycle(self, round_num, base_state, *, on_progress=None):
        self.base = next(iter(base_state.values())).flatten()[0].item()
        from tapestry.training.consortium.messages import (
            SovereignContribution,
            SovereignModelArtifact,
        )

        delta = {k: torch.full_like(v, self.value) for k, v in base_state.items()}
        return SovereignCycleResult(
            artifact=SovereignModelArtifact(self.node_id, self.node_id, "cpt", {}, {}, round_num),
            contribution=SovereignContribution(self.node_id, round_num, delta, 1.0, 1, {}),
        )

    def evaluate_candidate(self, round_num, candidate_state) -> MemberEvaluation:
        value = next(iter(candidate_state.values())).flatten()[0].item()
        self.judged.append(value)
        after = 0.5 if self.flatter else 1.0 + abs(value - self.target)
        return MemberEvaluation(self.node_id, 1.0 + abs(self.base - self.target), after)


def test_drop_one_commits_the_round_without_the_member_whose_delta_spoils_it() -> None:
    from tapestry.training.consortium.round.stages import DROPPED

    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    members = [Judge("a", 1.0, 1.0), Judge("b", 1.0, 1.0), Judge("rogue", -9.9, 1.0, True)]
    policy = ContributionPolicy(max_node_weight=0.5)
    result = ConsortiumCoordinator(
        base, policy, acceptance=AcceptancePolicy(max_halvings=1, drop_one=True), min_nodes=2
    ).run_round(members)

    validation = result.validation
    assert validation is not None and (validation.scale, validation.dropped) == (1.0, "rogue")
    assert [a.dropped for a in validation.attempts] == ["", "", "a", "b", "rogue"]
    assert [a.verdict.accepted for a in validation.attempts] == [False, False, False, False, True]
    assert torch.equal(result.shared_base_state["weight"], torch.ones(2, 2))  # a and b alone
    assert result.accepted_nodes == ["a", "b"] and result.rejected_nodes == ["rogue"]
    assert result.contribution_weights == {"a": 0.5, "b": 0.5}
    assert result.rejection_reasons == {"rogue": DROPPED}
    # every member judged the full step, the half step, then each candidate without one
    assert members[0].judged == pytest.approx([-2.6333, -1.3167, -4.45, -4.45, 1.0], abs=1e-3)
    wire = round_result_to_proto(result).validation
    assert [a.dropped for a in wire.attempts] == ["", "", "a", "b", "rogue"]
    assert wire.dropped == "rogue" and wire.drop_one


def test_drop_one_never_leaves_fewer_members_than_the_quorum() -> None:
    base = nn.Linear(2, 2, bias=False)
    members = [Judge("a", 1.0, 1.0), Judge("b", 1.0, 1.0), Judge("rogue", -9.9, 1.0, True)]
    policy = ContributionPolicy(max_node_weight=0.5)
    result = ConsortiumCoordinator(
        base, policy, acceptance=AcceptancePolicy(max_halvings=0, drop_one=True), min_nodes=3
    ).run_round(members)
    assert result.validation is not None and result.validation.scale is None
    assert [a.dropped for a in result.validation.attempts] == [""]  # no candidate without one
    assert result.shared_base_sha256 == result.previous_base_sha256


def test_with_drop_one_the_reversed_member_is_left_out_and_the_base_still_moves(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    honest = _members(make_node)
    coordinator = ConsortiumCoordinator(
        base_model,
        ContributionPolicy(max_delta_norm_ratio=10.0, max_node_weight=0.5),
        acceptance=AcceptancePolicy(drop_one=True),
    )
    probe = type(base_model)()
    for _ in range(2):
        result = coordinator.run_round([*honest, rogue_member(make_node)])
        assert result.validation is not None and result.validation.scale is not None
        assert "rogue" not in result.accepted_nodes
        assert result.shared_base_sha256 != result.previous_base_sha256  # not stalled
        for node_id in ("vn", "ch", "in"):
            before = _loss(probe, result.previous_base_state, node_id)
            after = _loss(probe, result.shared_base_state, node_id)
            assert after - before <= 0.01


def test_evaluated_quality_weighs_members_by_what_leaving_them_out_does_to_the_others() -> None:
    from tapestry.training.consortium.governance.measured import QualitySource

    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    members = [Judge("a", 1.0, 1.0), Judge("b", 1.0, 1.0), Judge("rogue", -9.9, 1.0, True)]
    result = ConsortiumCoordinator(
        base,
        ContributionPolicy(quality_floor=0.01, max_node_weight=0.5),
        acceptance=AcceptancePolicy(measure=True),
        min_nodes=2,
    ).run_round(members)

    validation = result.validation
    assert validation is not None
    assert [p.dropped for p in validation.probes] == ["", "a", "b", "rogue"]
    # Without a (or b) the others are no better: b's loss rises 1.8167 (from |-2.633-1|
    # to |-4.45-1|), the rogue says nothing changed: harm median(-1.82, 0) < 0, score 1.
    # Without the rogue, a and b are 3.633 nats better: exp(-3.633 / 0.1), under the floor.
    assert result.quality_scores["a"] == result.quality_scores["b"] == 1.0
    assert result.quality_scores["rogue"] == pytest.approx(math.exp(-36.333), rel=1e-3)
    assert set(result.quality_sources.values()) == {QualitySource.EVALUATED}
    assert result.contribution_weights == {"a": 0.5, "b": 0.5}
    assert "rogue" in result.rejected_nodes
    assert validation.scale == 1.0 and [a.scale for a in validation.attempts] == [1.0]
    assert torch.equal(result.shared_base_state["weight"], torch.ones(2, 2))
    # every member judged the four probes, then the candidate the scores give
    assert members[0].judged == pytest.approx([-2.6333, -4.45, -4.45, 1.0, 1.0], abs=1e-3)
    wire = round_result_to_proto(result)
    assert [p.dropped for p in wire.validation.probes] == ["", "a", "b", "rogue"]
    assert wire.validation.measure


class Spiteful(Judge):
    """A member that says every candidate after the first it is asked (the round's
    candidate) is a nat better for it: everyone else's contribution harms it."""

    def evaluate_candidate(self, round_num, candidate_state) -> MemberEvaluation:
        super().evaluate_candidate(round_num, candidate_state)
        return MemberEvaluation(self.node_id, 3.0, 3.0 if len(self.judged) == 1 else 2.0)


def test_evaluated_quality_that_weighs_nobody_commits_nothing_and_says_so() -> None:
    base = nn.Linear(2, 2, bias=False)
    before = state_digest(model_state(base))
    members = [Spiteful(n, 1.0, 1.0) for n in ("a", "b", "c")]
    result = ConsortiumCoordinator(
        base,
        ContributionPolicy(quality_floor=0.01),
        acceptance=AcceptancePolicy(measure=True),
        min_nodes=2,
    ).run_round(members)

    assert result.quality_scores == pytest.approx(dict.fromkeys("abc", math.exp(-10.0)))
    assert result.accepted_nodes == [] and result.shared_base_sha256 == before
    validation = result.validation
    assert validation is not None and validation.scale is None and len(validation.probes) == 4
    assert validation.reason == (
        "not committed: the policy weighs no contribution by its evaluated score"
    )
