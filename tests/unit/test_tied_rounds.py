"""In-process rounds with tied transformers: a shared update is applied once and kept once."""

from __future__ import annotations

import pytest
import torch

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    InvalidBase,
    ModelSpec,
    SovereignTrainingNode,
)
from tapestry.training.consortium.models.spec import GPT_TEST
from tapestry.training.consortium.models.state import model_state

from .conftest import CORPORA, JURISDICTIONS, QUALITY
from .tiny_models import HF_TINY_SPEC

SPECS = pytest.mark.parametrize(
    ("spec", "embedding", "head"),
    [
        (GPT_TEST, "token_embedding.weight", "lm_head.weight"),
        (HF_TINY_SPEC, "hf.transformer.wte.weight", "hf.lm_head.weight"),
    ],
    ids=["gpt", "hf"],
)


def nodes_for(spec: ModelSpec) -> list[SovereignTrainingNode]:
    return [
        SovereignTrainingNode(
            node_id,
            JURISDICTIONS[node_id],
            spec.build(7),
            CORPORA[node_id],
            QUALITY[node_id],
            local_epochs=1,
            lr=1e-2,
            batch_size=2,
            seed=7,
        )
        for node_id in ("vn", "ch", "in")
    ]


@SPECS
def test_a_round_applies_the_shared_tensors_update_once(
    spec: ModelSpec, embedding: str, head: str
) -> None:
    coordinator = ConsortiumCoordinator(spec.build(7), ContributionPolicy(max_node_weight=0.5))
    base = coordinator.shared_base_state
    # Each node's delta, computed by hand from its own cycle (the core is deterministic).
    deltas = {
        node.node_id: node.run_sovereign_cycle(1, base).contribution.weight_delta
        for node in nodes_for(spec)
    }

    result = coordinator.run_round(nodes_for(spec))

    assert result.accepted_nodes == ["vn", "ch", "in"]
    assert all(embedding in d and head not in d for d in deltas.values())
    new_base = result.shared_base_state
    assert head not in new_base
    assert all(bool(torch.isfinite(t).all()) for t in new_base.values())
    weights = result.contribution_weights
    for name in base:
        expected = base[name].double() + sum(weights[n] * deltas[n][name].double() for n in weights)
        torch.testing.assert_close(new_base[name].double(), expected, rtol=0, atol=1e-6)
    twice = base[embedding] + 2 * sum(weights[n] * deltas[n][embedding] for n in weights)
    assert not torch.allclose(new_base[embedding], twice, atol=1e-6)
    # The coordinator's own model keeps the tie, holding the once-updated tensor.
    live = dict(coordinator.base_model.named_parameters(remove_duplicate=False))
    assert live[head] is live[embedding]
    assert torch.equal(live[embedding].detach(), new_base[embedding])


@SPECS
def test_the_next_round_trains_from_the_tied_new_base(
    spec: ModelSpec, embedding: str, head: str
) -> None:
    coordinator = ConsortiumCoordinator(spec.build(7), ContributionPolicy(max_node_weight=0.5))
    nodes = nodes_for(spec)
    first = coordinator.run_round(nodes)

    second = coordinator.run_round(nodes)

    assert second.accepted_nodes == ["vn", "ch", "in"]
    assert second.previous_base_sha256 == first.shared_base_sha256
    for node in nodes:
        live = dict(node.model.named_parameters(remove_duplicate=False))
        assert live[head] is live[embedding]
        assert node.latest_artifact is not None
        assert list(node.latest_artifact.model_state) == list(model_state(node.model))


def test_a_node_given_the_state_dict_of_a_tied_model_says_what_to_pass() -> None:
    (node, *_) = nodes_for(GPT_TEST)
    with pytest.raises(
        InvalidBase, match=r"'lm_head.weight'\] is tied to another key: pass model_state"
    ):
        node.run_sovereign_cycle(1, GPT_TEST.build(7).state_dict())


def test_a_node_refuses_a_corpus_longer_than_the_context() -> None:
    with pytest.raises(
        ValueError, match="66 tokens, so 65 input positions, past the model's context_length = 64"
    ):
        SovereignTrainingNode("vn", "Vietnam", GPT_TEST.build(7), [list(range(66))], 0.9)
