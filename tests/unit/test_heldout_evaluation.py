"""Held-out evaluation in the core: each cycle measures the incoming base and the new
sovereign model on the node's held-out split, as numbers the coordinator bounds (issue 9 §3)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from tapestry.limits import MAX_HELDOUT_LOSS
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    HeldOutEvaluation,
    SovereignCycleResult,
    TinyCausalModel,
)
from tapestry.training.consortium.local.evaluation import heldout_loss, perplexity
from tapestry.training.consortium.local.node import pad_corpus

from .conftest import CORPORA, MakeNode, encode

HELDOUT = {
    "vn": [encode("Chợ nổi Cái Răng họp từ sáng sớm.")],
    "ch": [encode("Der Zug nach Chur fährt um acht."), encode("Le train part.")],
    "in": [encode("बारिश आज रात होगी।")],
}


def by_hand(model: nn.Module, sequences: list[list[int]]) -> tuple[float, int]:
    """Mean next-token cross-entropy, one sequence and one position at a time, in float64:
    no padding anywhere, so nothing to exclude."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            logits = model(torch.tensor([seq[:-1]])).double()[0]  # (T-1, V)
            log_probs = torch.log_softmax(logits, dim=-1)
            for position, target in enumerate(seq[1:]):
                total -= float(log_probs[position, target])
                tokens += 1
    return total / tokens, tokens


def test_heldout_loss_is_the_mean_cross_entropy_over_real_targets(base_model: nn.Module) -> None:
    sequences = [encode("ab"), encode("a longer line, so the others are padded"), [0, 0, 7]]
    inputs, targets = pad_corpus(sequences)

    loss, tokens = heldout_loss(base_model, inputs, targets, batch_size=2)

    expected, expected_tokens = by_hand(base_model, sequences)
    assert tokens == expected_tokens == sum(len(s) - 1 for s in sequences)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert perplexity(loss) == pytest.approx(math.exp(expected), rel=1e-6)


def test_padding_is_never_evaluated(base_model: nn.Module) -> None:
    """A short sequence padded next to a long one scores exactly as it does alone."""
    short = [encode("Cần Thơ")]
    alone = heldout_loss(base_model, *pad_corpus(short), batch_size=1)
    inputs, targets = pad_corpus(short + [encode("x" * 100)])
    padded = heldout_loss(base_model, inputs[:1], targets[:1], batch_size=1)  # 93 pad targets

    assert padded[1] == alone[1] == len(short[0]) - 1
    assert padded[0] == pytest.approx(alone[0], rel=1e-6)


def test_heldout_loss_is_deterministic_and_leaves_the_model_as_it_was(
    base_model: nn.Module,
) -> None:
    inputs, targets = pad_corpus(CORPORA["vn"])
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    base_model.train()

    first = heldout_loss(base_model, inputs, targets, batch_size=2)
    again = heldout_loss(base_model, inputs, targets, batch_size=2)
    one_batch = heldout_loss(base_model, inputs, targets, batch_size=64)

    assert first == again
    assert one_batch[0] == pytest.approx(first[0], rel=1e-6)
    assert base_model.training  # its mode is restored
    for name, tensor in base_model.state_dict().items():
        assert torch.equal(tensor, before[name])
        assert tensor.grad is None


def test_a_heldout_split_of_padding_only_is_refused(base_model: nn.Module) -> None:
    inputs, targets = pad_corpus([[1, 2]])
    with pytest.raises(ValueError, match="no target token"):
        heldout_loss(base_model, inputs, torch.full_like(targets, -100), batch_size=1)


def test_the_cycle_evaluates_the_base_before_and_its_own_model_after(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    node = make_node("vn", heldout_corpus=HELDOUT["vn"])
    base = base_model.state_dict()

    result = node.run_sovereign_cycle(1, base)

    evaluation = result.contribution.evaluation
    assert isinstance(evaluation, HeldOutEvaluation)
    sovereign = TinyCausalModel()
    sovereign.load_state_dict(result.artifact.model_state)
    base_by_hand, tokens = by_hand(base_model, HELDOUT["vn"])
    sovereign_by_hand, _ = by_hand(sovereign, HELDOUT["vn"])
    assert evaluation.tokens == tokens == len(HELDOUT["vn"][0]) - 1
    assert evaluation.base_loss == pytest.approx(base_by_hand, rel=1e-6)
    assert evaluation.sovereign_loss == pytest.approx(sovereign_by_hand, rel=1e-6)
    assert evaluation.base_perplexity == math.exp(evaluation.base_loss)
    assert evaluation.sovereign_perplexity == math.exp(evaluation.sovereign_loss)
    assert 0 < evaluation.sovereign_loss < evaluation.base_loss  # Vietnamese helps Vietnamese
    # The training metrics are the proof of concept's, unchanged.
    assert dict(result.contribution.metrics).keys() == {"loss"}


def test_evaluating_changes_nothing_a_cycle_trains(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    base = base_model.state_dict()
    plain = make_node("ch").run_sovereign_cycle(3, base)
    evaluated = make_node("ch", heldout_corpus=HELDOUT["ch"]).run_sovereign_cycle(3, base)

    assert plain.contribution.evaluation is None  # the proof of concept's constructor
    assert evaluated.contribution.evaluation is not None
    assert plain.contribution.metrics == evaluated.contribution.metrics
    for name, delta in plain.contribution.weight_delta.items():
        assert torch.equal(delta, evaluated.contribution.weight_delta[name]), name


@pytest.mark.parametrize(
    ("heldout", "message"),
    [
        ([], "heldout_corpus has no sequence of 2 or more tokens"),
        ([[5]], "heldout_corpus has no sequence of 2 or more tokens"),
        ([[1, 2], [3, 999]], r"heldout_corpus sequence 1 has token id 999; .*\[0, 256\)"),
    ],
)
def test_an_unusable_heldout_corpus_is_refused(
    make_node: MakeNode, heldout: list[list[int]], message: str
) -> None:
    with pytest.raises(ValueError, match=f"node 'vn': {message}"):
        make_node("vn", heldout_corpus=heldout)


def test_the_round_result_carries_every_nodes_evaluation(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    nodes = [make_node(n, heldout_corpus=HELDOUT[n]) for n in ("vn", "ch", "in")]
    coordinator = ConsortiumCoordinator(base_model)

    first = coordinator.run_round(nodes)
    second = coordinator.run_round(nodes)

    for node_id in ("vn", "ch", "in"):
        one = first.contributions[node_id].evaluation
        two = second.contributions[node_id].evaluation
        assert one is not None and two is not None
        # Round 2 starts from the integrated base, which learned from every member.
        assert two.base_loss < one.base_loss


GOOD = HeldOutEvaluation(5.5, math.exp(5.5), 3.25, math.exp(3.25), 1234)


class Reporting:
    """A node whose cycle is honest except for the evaluation it reports."""

    def __init__(self, inner: object, evaluation: object) -> None:
        self.inner, self.evaluation = inner, evaluation
        self.node_id = inner.node_id  # type: ignore[attr-defined]
        self.jurisdiction = inner.jurisdiction  # type: ignore[attr-defined]

    def run_sovereign_cycle(self, round_num: int, base: dict) -> SovereignCycleResult:
        result = self.inner.run_sovereign_cycle(round_num, base)  # type: ignore[attr-defined]
        contribution = dataclasses.replace(result.contribution, evaluation=self.evaluation)
        return dataclasses.replace(result, contribution=contribution)


@pytest.mark.parametrize(
    ("evaluation", "reason"),
    [
        (
            dataclasses.replace(GOOD, sovereign_loss=math.nan),
            "evaluation sovereign_loss is nan, not a finite number",
        ),
        (
            dataclasses.replace(GOOD, base_perplexity=math.inf),
            "evaluation base_perplexity is inf, not a finite number",
        ),
        (
            dataclasses.replace(GOOD, base_loss=-0.5, base_perplexity=math.exp(-0.5)),
            "evaluation base_loss is -0.5, outside [0, MAX_HELDOUT_LOSS = 700] nats",
        ),
        (
            dataclasses.replace(GOOD, sovereign_loss=1e6, sovereign_perplexity=1e300),
            "evaluation sovereign_loss is 1e+06, outside [0, MAX_HELDOUT_LOSS = 700] nats",
        ),
        (
            dataclasses.replace(GOOD, sovereign_perplexity=1.0),
            "evaluation sovereign_perplexity is 1, not exp(sovereign_loss) = 25.7903",
        ),
        (dataclasses.replace(GOOD, tokens=0), "evaluation tokens must be an integer in [1, "),
        (dataclasses.replace(GOOD, tokens=2**60), "evaluation tokens must be an integer in [1, "),
        (dataclasses.replace(GOOD, base_loss="5.5"), "evaluation base_loss is a str, not a number"),
        ({"base_loss": 5.5}, "evaluation must be a HeldOutEvaluation, got dict"),
    ],
    ids=[
        "nan",
        "inf",
        "negative",
        "huge",
        "inconsistent",
        "no-tokens",
        "many-tokens",
        "text",
        "dict",
    ],
)
def test_admission_refuses_an_evaluation_out_of_bounds(
    make_node: MakeNode, base_model: nn.Module, evaluation: object, reason: str
) -> None:
    honest, lying = make_node("vn"), Reporting(make_node("ch"), evaluation)

    result = ConsortiumCoordinator(base_model).run_round([honest, lying])  # type: ignore[list-item]

    assert result.accepted_nodes == ["vn"]
    assert result.failed_nodes["ch"].startswith(f"invalid contribution: {reason}")


def test_admission_takes_an_evaluation_within_bounds(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    edge = HeldOutEvaluation(0.0, 1.0, MAX_HELDOUT_LOSS, math.exp(MAX_HELDOUT_LOSS), 1)
    nodes = [make_node("vn"), Reporting(make_node("ch"), edge)]

    result = ConsortiumCoordinator(base_model).run_round(nodes)  # type: ignore[arg-type]

    assert result.failed_nodes == {}
    assert result.contributions["ch"].evaluation == edge


def test_perplexity_past_a_double_is_inf_not_an_error() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(1000.0) == math.inf


# -- a member's evaluation of a round's candidate base (member-validated commit) -----------


def test_a_member_evaluates_a_candidate_against_the_base_it_trained_from(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    node = make_node("vn", heldout_corpus=HELDOUT["vn"])
    base = base_model.state_dict()
    trained = node.run_sovereign_cycle(1, base)
    own = trained.artifact.model_state

    on_own = node.evaluate_candidate(1, own)  # its own trained model as the candidate
    on_base = node.evaluate_candidate(1, base)

    assert on_own is not None and on_base is not None
    assert on_own.node_id == "vn"
    assert on_own.base_loss == on_base.base_loss == trained.contribution.evaluation.base_loss
    assert on_own.candidate_loss == pytest.approx(
        trained.contribution.evaluation.sovereign_loss, rel=1e-6
    )
    assert on_base.change == pytest.approx(0.0, abs=1e-6)
    assert on_own.change < 0  # what it trained improves its own held-out split
    sovereign = TinyCausalModel()
    sovereign.load_state_dict(own)
    assert on_own.candidate_loss == pytest.approx(by_hand(sovereign, HELDOUT["vn"])[0], rel=1e-6)


def test_a_candidate_far_past_any_loss_is_an_objection_at_the_bound(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    node = make_node("vn", heldout_corpus=HELDOUT["vn"])
    base = base_model.state_dict()
    node.run_sovereign_cycle(1, base)
    wild = {name: tensor * 0 + 1e30 * (-1) ** torch.arange(tensor.numel()).reshape(tensor.shape)
            for name, tensor in base.items()}  # fmt: skip

    evaluation = node.evaluate_candidate(1, wild)

    assert evaluation is not None and evaluation.candidate_loss == MAX_HELDOUT_LOSS


def test_a_candidate_is_checked_as_a_base_and_only_for_a_round_the_member_trained(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    node = make_node("vn", heldout_corpus=HELDOUT["vn"])
    base = base_model.state_dict()
    with pytest.raises(ValueError, match="did not train round 1"):
        node.evaluate_candidate(1, base)
    node.run_sovereign_cycle(1, base)
    with pytest.raises(ValueError, match="did not train round 2"):
        node.evaluate_candidate(2, base)
    nan = {name: tensor.clone() for name, tensor in base.items()}
    next(iter(nan.values())).view(-1)[0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        node.evaluate_candidate(1, nan)
    assert make_node("ch").evaluate_candidate(1, base) is None  # no held-out split


def test_a_round_past_max_round_num_is_refused_whatever_gap_the_node_allows(
    make_node: MakeNode, base_model: nn.Module
) -> None:
    from tapestry.limits import MAX_ROUND_NUM
    from tapestry.training.consortium import InvalidBase

    node = make_node("vn")
    with pytest.raises(InvalidBase, match="past MAX_ROUND_NUM"):
        node.run_sovereign_cycle(MAX_ROUND_NUM + 1, base_model.state_dict())
