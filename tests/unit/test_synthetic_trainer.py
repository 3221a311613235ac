"""The benchmarks' synthetic trainer: a seeded random update through the real cycle path,
and the model bounds that let a benchmark configure 100M+ parameter models."""

from __future__ import annotations

import pytest
import torch

from tapestry.config import ModelTable, NodeConfig, build_config
from tapestry.limits import MAX_MODEL_PARAMS
from tapestry.training.consortium import SovereignTrainingNode, TinyCausalModel, state_digest
from tapestry.training.consortium.local.node import SYNTHETIC_DELTA_STD
from tapestry.training.consortium.models.state import model_state

CORPUS = [[1, 2, 3, 4], [5, 6, 7]]


def synthetic_node(node_id: str = "n1", seed: int = 7) -> SovereignTrainingNode:
    model = TinyCausalModel(256, 16)
    return SovereignTrainingNode(node_id, "J", model, CORPUS, 0.9, seed=seed, trainer="synthetic")


def test_the_synthetic_update_is_seeded_per_node_and_round_and_goes_through_the_cycle() -> None:
    base = {k: v.clone() for k, v in model_state(TinyCausalModel(256, 16)).items()}
    first = synthetic_node().run_sovereign_cycle(1, base)
    again = synthetic_node().run_sovereign_cycle(1, base)
    other_round = synthetic_node().run_sovereign_cycle(2, base)
    other_node = synthetic_node("n2").run_sovereign_cycle(1, base)
    delta = first.contribution.weight_delta
    assert state_digest(delta) == state_digest(again.contribution.weight_delta)
    assert state_digest(delta) != state_digest(other_round.contribution.weight_delta)
    assert state_digest(delta) != state_digest(other_node.contribution.weight_delta)
    for name, tensor in delta.items():  # trained = base + delta, as for real training
        assert torch.equal(first.artifact.model_state[name] - base[name], tensor)
        assert 0 < float(tensor.abs().max()) < 10 * SYNTHETIC_DELTA_STD
    assert first.artifact.model_state_sha256 == state_digest(first.artifact.model_state)
    assert first.contribution.metrics == {"loss": 0.0}


def test_an_unknown_trainer_is_refused() -> None:
    with pytest.raises(ValueError, match=r"trainer must be one of \('real', 'synthetic'\)"):
        SovereignTrainingNode("n1", "J", TinyCausalModel(256, 4), CORPUS, 0.9, trainer="fake")


def test_node_config_names_its_trainer_real_by_default() -> None:
    raw = {"node_id": "n1", "jurisdiction": "J", "consortium_id": "c", "quality_score": 0.9}
    raw["corpus"] = ["a.txt"]
    assert build_config(NodeConfig, raw, "n").training.trainer == "real"
    synthetic = {**raw, "training": {"trainer": "synthetic"}}
    assert build_config(NodeConfig, synthetic, "n").training.trainer == "synthetic"


def test_a_400m_parameter_model_can_be_configured_and_a_typo_cannot() -> None:
    config = build_config(ModelTable, {"hidden_size": 781_250}, "consortium.toml")
    assert config.estimated_params() == 2 * 256 * 781_250 + 256
    with pytest.raises(ValueError, match="more than MAX_MODEL_PARAMS"):
        build_config(ModelTable, {"vocab_size": 1 << 20, "hidden_size": 1 << 24}, "c.toml")
    assert MAX_MODEL_PARAMS == 1 << 36
