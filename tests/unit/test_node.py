"""SovereignTrainingNode: validation, padding, local training and the delta it contributes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tapestry.training.consortium import (
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
    SovereignTrainingNode,
    TinyCausalModel,
    cycle_seed,
    state_digest,
)
from tapestry.training.consortium.local.node import pad_corpus

from .conftest import MakeNode, StatesEqual


def reference_cycle(
    base_state: ModelState,
    corpus: Sequence[Sequence[int]],
    *,
    node_id: str,
    round_num: int,
    seed: int,
    local_epochs: int,
    lr: float,
    batch_size: int,
) -> tuple[ModelState, float]:
    """The documented training, written out independently of the node's code.

    Right-pad with 0 to the longest; inputs ``x[:, :-1]``, targets ``x[:, 1:]`` with padded
    positions (known by length) ignored; sequences under 2 tokens left out; each epoch a
    permutation from a generator seeded by ``cycle_seed``; AdamW(lr) + cross-entropy; the
    reported loss is the mean of the per-batch losses.
    """
    rows = [list(seq) for seq in corpus if len(seq) >= 2]
    longest = max(len(seq) for seq in rows)
    padded = torch.zeros(len(rows), longest, dtype=torch.long)
    real = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, seq in enumerate(rows):
        padded[i, : len(seq)] = torch.tensor(seq)
        real[i, : len(seq)] = True
    inputs = padded[:, :-1]
    targets = padded[:, 1:].masked_fill(~real[:, 1:], -100)

    model = TinyCausalModel()
    model.load_state_dict(base_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(cycle_seed(seed, node_id, round_num))
    losses = []
    for _ in range(local_epochs):
        order = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(rows), batch_size):
            batch = order[start : start + batch_size]
            logits = model(inputs[batch])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[batch].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return model.state_dict(), sum(losses) / len(losses)


def pair_loss(base_state: ModelState, pairs: Sequence[tuple[int, int]]) -> float:
    """Mean cross-entropy of next-token ``(input, target)`` pairs under ``base_state``."""
    model = TinyCausalModel()
    model.load_state_dict(base_state)
    with torch.no_grad():
        logits = model(torch.tensor([[inp for inp, _ in pairs]]))[0]  # (n, V)
        return F.cross_entropy(logits, torch.tensor([tgt for _, tgt in pairs])).item()


# --- construction -----------------------------------------------------------------------


def test_node_keeps_a_deep_copy_of_the_model(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    node = make_node("vn", model=base_model)

    assert node.model is not base_model
    with torch.no_grad():
        for parameter in base_model.parameters():
            parameter.add_(1.0)

    states_equal(node.model.state_dict(), before)


def test_node_keeps_its_settings(make_node: MakeNode) -> None:
    node = make_node("ch", quality_score=0.5, local_epochs=4, lr=0.5, batch_size=3)

    assert (node.node_id, node.jurisdiction, node.quality_score) == ("ch", "Switzerland", 0.5)
    assert (node.local_epochs, node.lr, node.batch_size) == (4, 0.5, 3)
    assert node.latest_artifact is None


def test_proof_of_concept_defaults(base_model: nn.Module) -> None:
    node = SovereignTrainingNode("vn", "Vietnam", base_model, [[1, 2, 3]], 0.9)

    assert (node.local_epochs, node.lr, node.batch_size) == (3, 1e-3, 8)


def test_empty_corpus_is_refused(make_node: MakeNode) -> None:
    with pytest.raises(ValueError, match=r"^node 'vn': sovereign_corpus is empty$"):
        make_node("vn", corpus=[])


@pytest.mark.parametrize("corpus", [[[]], [[7]], [[1], [2], []]])
def test_corpus_without_a_two_token_sequence_is_refused(
    make_node: MakeNode, corpus: list[list[int]]
) -> None:
    longest = max(len(seq) for seq in corpus)
    with pytest.raises(ValueError, match=rf"longest corpus sequence has {longest} token\(s\)"):
        make_node("vn", corpus=corpus)


@pytest.mark.parametrize("token", [256, 1000, -1, 1.5, True])
def test_token_outside_the_vocabulary_is_refused(make_node: MakeNode, token: int) -> None:
    expected = (
        rf"^node 'vn': sequence 1 has token id {token!r}; "
        rf"token ids are integers in \[0, 256\)$"
    )
    with pytest.raises(ValueError, match=expected):
        make_node("vn", corpus=[[1, 2], [3, token, 4]])


def test_vocabulary_check_follows_the_model(make_node: MakeNode) -> None:
    small = TinyCausalModel(vocab_size=16, hidden_size=4)

    make_node("vn", model=small, corpus=[[0, 15]])
    with pytest.raises(ValueError, match=r"token id 16; token ids are integers in \[0, 16\)"):
        make_node("vn", model=small, corpus=[[0, 16]])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"quality_score": math.nan}, "quality_score must be finite"),
        ({"quality_score": math.inf}, "quality_score must be finite"),
        ({"local_epochs": 0}, "need local_epochs >= 1"),
        ({"batch_size": 0}, "need local_epochs >= 1"),
        ({"lr": 0.0}, "need local_epochs >= 1"),
    ],
)
def test_other_invalid_settings_are_refused(
    make_node: MakeNode, overrides: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_node("vn", **overrides)


def test_empty_node_id_is_refused(make_node: MakeNode) -> None:
    with pytest.raises(ValueError, match="node_id must be a non-empty string"):
        make_node("", corpus=[[1, 2]], quality_score=0.9)


# --- padding ----------------------------------------------------------------------------


def test_pad_corpus_right_pads_with_zero_and_ignores_padding_by_length() -> None:
    inputs, targets = pad_corpus([[5, 6, 7, 8], [9, 10], [11, 0, 12], [13]])

    # [13] has no next token: left out. Padded to the longest (4): inputs x[:, :-1] ...
    assert torch.equal(inputs, torch.tensor([[5, 6, 7], [9, 10, 0], [11, 0, 12]]))
    # ... targets x[:, 1:], with every padded position ignored (-100), real zeros kept.
    assert torch.equal(targets, torch.tensor([[6, 7, 8], [10, -100, -100], [0, 12, -100]]))
    assert inputs.dtype == targets.dtype == torch.long


def test_byte_zero_inside_a_sequence_is_a_real_target(
    base_model: nn.Module, make_node: MakeNode
) -> None:
    base = base_model.state_dict()
    node = make_node("vn", corpus=[[1, 0, 2], [3, 4]], local_epochs=1, batch_size=8)

    loss = node.run_sovereign_cycle(1, base).contribution.metrics["loss"]

    # One step: the reported loss is the base's loss over exactly the real pairs,
    # (1 -> 0) and (0 -> 2) included; the pad after [3, 4] adds nothing.
    assert loss == pytest.approx(pair_loss(base, [(1, 0), (0, 2), (3, 4)]), rel=1e-6)
    assert loss != pytest.approx(pair_loss(base, [(0, 2), (3, 4)]), rel=1e-6)


def test_padding_is_not_trained(base_model: nn.Module, make_node: MakeNode) -> None:
    base = base_model.state_dict()
    padded = make_node("vn", corpus=[[1, 2, 3, 4], [5, 6]], local_epochs=1, batch_size=8)
    # The same next-token pairs with no padding at all (the model is position-free).
    unpadded = make_node(
        "vn", corpus=[[1, 2], [2, 3], [3, 4], [5, 6]], local_epochs=1, batch_size=8
    )

    padded_result = padded.run_sovereign_cycle(1, base)
    unpadded_result = unpadded.run_sovereign_cycle(1, base)

    real_pairs = [(1, 2), (2, 3), (3, 4), (5, 6)]
    with_padding_trained = real_pairs + [(6, 0), (0, 0)]
    loss = padded_result.contribution.metrics["loss"]
    assert loss == pytest.approx(pair_loss(base, real_pairs), rel=1e-6)
    assert loss != pytest.approx(pair_loss(base, with_padding_trained), rel=1e-3)
    for name, tensor in padded_result.artifact.model_state.items():
        assert torch.allclose(tensor, unpadded_result.artifact.model_state[name], atol=1e-6), name


def test_short_sequences_are_left_out_of_training_but_counted(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = base_model.state_dict()
    with_short = make_node("vn", corpus=[[1, 2, 3], [9], [4, 5, 6, 7], []])
    without = make_node("vn", corpus=[[1, 2, 3], [4, 5, 6, 7]])

    a = with_short.run_sovereign_cycle(1, base)
    b = without.run_sovereign_cycle(1, base)

    states_equal(a.artifact.model_state, b.artifact.model_state)
    assert a.contribution.metrics == b.contribution.metrics
    assert (a.contribution.token_count, b.contribution.token_count) == (8, 7)


# --- the sovereign cycle ----------------------------------------------------------------


def test_cycle_trains_as_documented(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = base_model.state_dict()
    corpus = [[1, 2, 3, 0, 4], [5, 6], [7], [8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18]]
    node = make_node("vn", corpus=corpus, local_epochs=3, lr=0.05, batch_size=2, seed=42)

    result = node.run_sovereign_cycle(4, base)

    expected_state, expected_loss = reference_cycle(
        base,
        corpus,
        node_id="vn",
        round_num=4,
        seed=42,
        local_epochs=3,
        lr=0.05,
        batch_size=2,
    )
    states_equal(result.artifact.model_state, expected_state)
    assert result.artifact.metrics == {"loss": expected_loss}
    assert result.contribution.metrics == {"loss": expected_loss}


def test_cycle_result_carries_the_artifact_and_the_contribution(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = base_model.state_dict()
    node = make_node("ch", quality_score=0.86)

    result = node.run_sovereign_cycle(3, base)

    assert isinstance(result, SovereignCycleResult)
    artifact, contribution = result.artifact, result.contribution
    assert isinstance(artifact, SovereignModelArtifact)
    assert (artifact.node_id, artifact.jurisdiction, artifact.stage, artifact.round_num) == (
        "ch",
        "Switzerland",
        "continued_pretraining",
        3,
    )
    assert set(artifact.metrics) == {"loss"}
    assert math.isfinite(artifact.metrics["loss"]) and artifact.metrics["loss"] > 0
    assert artifact.model_state_sha256 == state_digest(artifact.model_state)
    assert artifact.model_state_bytes == sum(
        t.numel() * t.element_size() for t in artifact.model_state.values()
    )
    assert node.latest_artifact is artifact
    states_equal(node.model.state_dict(), artifact.model_state)

    assert isinstance(contribution, SovereignContribution)
    assert (contribution.node_id, contribution.round_num, contribution.quality_score) == (
        "ch",
        3,
        0.86,
    )
    corpus_tokens = sum(len(line) for line in node.sovereign_corpus)
    assert contribution.token_count == corpus_tokens
    assert contribution.metrics == artifact.metrics


def test_delta_is_trained_minus_base_for_every_key(
    base_model: nn.Module, make_node: MakeNode
) -> None:
    base = base_model.state_dict()
    result = make_node("in").run_sovereign_cycle(1, base)

    trained, delta = result.artifact.model_state, result.contribution.weight_delta
    assert list(delta) == list(base) == list(trained)
    for name in base:
        assert delta[name].dtype == base[name].dtype and delta[name].shape == base[name].shape
        assert torch.equal(delta[name], trained[name] - base[name]), name
        assert delta[name].abs().sum() > 0, f"{name} did not train"


def test_cycle_does_not_modify_the_base_state_it_is_given(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    pristine = {k: v.clone() for k, v in base.items()}
    node = make_node("vn")

    result = node.run_sovereign_cycle(1, base)

    states_equal(base, pristine)
    # the retained artifact shares no storage with the base or with the node's live model
    for name, tensor in result.artifact.model_state.items():
        assert tensor.data_ptr() != base[name].data_ptr()
        assert tensor.data_ptr() != node.model.state_dict()[name].data_ptr()


def test_later_cycles_start_from_the_base_they_are_given(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = base_model.state_dict()
    node = make_node("vn")

    first = node.run_sovereign_cycle(1, base)
    node.run_sovereign_cycle(2, first.artifact.model_state)  # trains the node's model further
    again = node.run_sovereign_cycle(1, base)

    states_equal(again.artifact.model_state, first.artifact.model_state)
    assert again.contribution.metrics == first.contribution.metrics


def test_the_model_shares_no_memory_with_the_base_it_was_loaded_from(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    node = make_node("vn")
    result = node.run_sovereign_cycle(1, base)
    trained = {k: v.clone() for k, v in node.model.state_dict().items()}

    for tensor in base.values():  # the caller edits its base after the cycle
        tensor.fill_(7.0)

    states_equal(node.model.state_dict(), trained)
    states_equal(result.artifact.model_state, trained)


def test_persist_stores_the_trained_state_and_the_node_keeps_no_copy(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = base_model.state_dict()
    in_memory = make_node("ch").run_sovereign_cycle(2, base)
    stored: list[ModelState] = []

    def persist(artifact: SovereignModelArtifact) -> SovereignModelArtifact:
        assert artifact.model_state_sha256 == state_digest(artifact.model_state)
        stored.append({k: v.clone() for k, v in artifact.model_state.items()})
        return dataclasses.replace(artifact, stored_at="/kept/on/disk")

    node = make_node("ch")
    result = node.run_sovereign_cycle(2, base, persist=persist)

    # the same bits as without a store; only where the trained state is kept differs
    assert len(stored) == 1
    states_equal(stored[0], in_memory.artifact.model_state)
    states_equal(result.contribution.weight_delta, in_memory.contribution.weight_delta)
    assert result.artifact == dataclasses.replace(
        in_memory.artifact, model_state={}, stored_at="/kept/on/disk"
    )
    assert node.latest_artifact is result.artifact
    assert result.contribution.metrics == in_memory.contribution.metrics


def test_a_failing_persist_fails_the_cycle_and_keeps_the_earlier_artifact(
    base_model: nn.Module, make_node: MakeNode
) -> None:
    node = make_node("ch")
    first = node.run_sovereign_cycle(1, base_model.state_dict())

    def persist(artifact: SovereignModelArtifact) -> SovereignModelArtifact:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        node.run_sovereign_cycle(2, base_model.state_dict(), persist=persist)
    assert node.latest_artifact is first.artifact


def test_no_gradients_are_kept_after_a_cycle(base_model: nn.Module, make_node: MakeNode) -> None:
    node = make_node("ch")
    node.run_sovereign_cycle(1, base_model.state_dict())

    assert all(p.grad is None for p in node.model.parameters())


# --- determinism ------------------------------------------------------------------------


def test_identically_built_nodes_give_identical_bits(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = base_model.state_dict()

    a = make_node("ch").run_sovereign_cycle(2, base)
    b = make_node("ch").run_sovereign_cycle(2, base)

    states_equal(a.artifact.model_state, b.artifact.model_state)
    states_equal(a.contribution.weight_delta, b.contribution.weight_delta)
    assert a.contribution.metrics == b.contribution.metrics
    assert a.artifact.model_state_sha256 == b.artifact.model_state_sha256


def test_rounds_shuffle_differently(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = base_model.state_dict()
    corpus = [[i, i + 1, i + 2] for i in range(1, 30, 3)]  # 10 rows, batches of 2
    node = make_node("vn", corpus=corpus)

    round_1 = node.run_sovereign_cycle(1, base)
    round_2 = node.run_sovereign_cycle(2, base)

    assert round_1.artifact.model_state_sha256 != round_2.artifact.model_state_sha256
    for round_num, result in ((1, round_1), (2, round_2)):
        expected, loss = reference_cycle(
            base,
            corpus,
            node_id="vn",
            round_num=round_num,
            seed=7,
            local_epochs=2,
            lr=1e-2,
            batch_size=2,
        )
        states_equal(result.artifact.model_state, expected)
        assert result.contribution.metrics["loss"] == loss


def test_consortium_seed_changes_the_shuffle(base_model: nn.Module, make_node: MakeNode) -> None:
    base = base_model.state_dict()
    corpus = [[i, i + 1, i + 2] for i in range(1, 30, 3)]

    a = make_node("vn", corpus=corpus, seed=1).run_sovereign_cycle(1, base)
    b = make_node("vn", corpus=corpus, seed=2).run_sovereign_cycle(1, base)

    assert a.artifact.model_state_sha256 != b.artifact.model_state_sha256


def test_training_neither_uses_nor_disturbs_the_global_rng(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    base = base_model.state_dict()
    node = make_node("in")

    torch.manual_seed(2024)
    expected_draw = torch.rand(4)
    torch.manual_seed(2024)
    first = node.run_sovereign_cycle(1, base)
    draw_after_cycle = torch.rand(4)
    torch.manual_seed(99)
    second = node.run_sovereign_cycle(1, base)

    assert torch.equal(draw_after_cycle, expected_draw)
    states_equal(first.artifact.model_state, second.artifact.model_state)


def test_cycle_seed_depends_on_seed_node_and_round() -> None:
    seeds = {
        cycle_seed(0, "vn", 1),
        cycle_seed(1, "vn", 1),
        cycle_seed(0, "ch", 1),
        cycle_seed(0, "vn", 2),
    }

    assert len(seeds) == 4
    assert cycle_seed(0, "vn", 1) == cycle_seed(0, "vn", 1)
    assert all(0 <= s < 2**63 for s in seeds)
