"""``ConsortiumCoordinator(copy_states=False)``: the services' coordinator holds the base and
the one state integration builds, and gives the very bits the copying one gives."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    ModelState,
    state_digest,
)
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.models.state import install_model_state, model_state
from tapestry.training.consortium.strategies.settings import IntegrationStrategy, StrategyName

from .conftest import CONSORTIUM_SEED, MakeNodes

POLICIES: dict[str, Callable[[], ContributionPolicy]] = {
    "capped": lambda: ContributionPolicy(max_node_weight=0.5),
    "floor rejects one": lambda: ContributionPolicy(quality_floor=0.6),
    "all rejected": lambda: ContributionPolicy(quality_floor=0.99),
    "norm bound": lambda: ContributionPolicy(max_delta_norm_ratio=1.5, weighting="equal"),
    "clipped": lambda: ContributionPolicy(
        strategy=IntegrationStrategy(StrategyName.FEDAVG, clip_delta_norm=1e-3)
    ),
    "diloco": lambda: ContributionPolicy(strategy="diloco"),
    "median": lambda: ContributionPolicy(strategy="median"),
}


def _digests(
    base_model: nn.Module, make_nodes: MakeNodes, policy: ContributionPolicy, *, copy: bool
) -> list[str]:
    coordinator = ConsortiumCoordinator(base_model, policy, copy_states=copy)
    nodes = make_nodes(("vn", "ch", "in"))
    for node, score in zip(nodes, (0.9, 0.5, 0.8), strict=True):
        node.quality_score = score
    digests = []
    for _ in range(3):
        result = coordinator.run_round(nodes)
        digests.append(state_digest(result.shared_base_state))
        assert result.shared_base_sha256 == digests[-1]
    return digests


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_copies_give_the_same_bits_as_copies(
    name: str, base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    copying = _digests(base_model, make_nodes, POLICIES[name](), copy=True)
    # The coordinator without copies keeps the model it is given: hand it its own.
    fresh = ModelSpec().build(CONSORTIUM_SEED)
    assert _digests(fresh, make_nodes, POLICIES[name](), copy=False) == copying
    if name == "all rejected":
        assert len(set(copying)) == 1
    else:
        assert len(set(copying)) == 3


def test_without_copies_the_result_holds_the_bases_before_and_after(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    before = {name: t.clone() for name, t in model_state(base_model).items()}
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(), copy_states=False)
    assert coordinator.base_model is base_model  # kept, not copied

    result = coordinator.run_round(make_nodes())

    after = model_state(base_model)
    for name, tensor in result.previous_base_state.items():
        assert torch.equal(tensor, before[name])  # the old base, untouched by the commit
        assert tensor.data_ptr() != after[name].data_ptr()
    for name, tensor in result.shared_base_state.items():
        assert tensor.data_ptr() == after[name].data_ptr()  # the new base is the model's
    assert state_digest(after) == result.shared_base_sha256 != result.previous_base_sha256


def test_without_copies_a_rollback_installs_the_given_state(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(), copy_states=False)
    first = {name: t.clone() for name, t in model_state(base_model).items()}
    coordinator.run_round(make_nodes())

    result = coordinator.roll_back(first, 0)

    assert state_digest(model_state(base_model)) == state_digest(first)
    assert result.shared_base_sha256 == state_digest(first)
    assert state_digest(result.previous_base_state) != state_digest(first)


def _tied() -> nn.Module:
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    model[1].weight = model[0].weight  # type: ignore[assignment]
    model.register_buffer("steps", torch.tensor(0))
    return model


def test_install_makes_the_tensors_the_models_own_and_keeps_ties() -> None:
    model = _tied()
    state: ModelState = {
        "0.weight": torch.full((4, 3), 2.0),
        "steps": torch.tensor(5),
    }
    assert sorted(model_state(model)) == sorted(state)

    install_model_state(model, state)

    assert model[0].weight.data_ptr() == state["0.weight"].data_ptr()
    assert model[1].weight is model[0].weight  # still one parameter
    assert model.steps.data_ptr() == state["steps"].data_ptr()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"0.weight": torch.zeros(4, 3)}, "missing ['steps']"),
        (
            {"0.weight": torch.zeros(4, 3), "steps": torch.tensor(0), "x": torch.zeros(1)},
            "unexpected ['x']",
        ),
        (
            {"0.weight": torch.zeros(4, 3, dtype=torch.float64), "steps": torch.tensor(0)},
            "'0.weight': the model holds torch.float32 (4, 3), the state torch.float64 (4, 3)",
        ),
        (
            {"0.weight": torch.zeros(3, 4), "steps": torch.tensor(0)},
            "the model holds torch.float32 (4, 3), the state torch.float32 (3, 4)",
        ),
    ],
)
def test_install_refuses_another_layout_and_changes_nothing(
    state: ModelState, message: str
) -> None:
    model = _tied()
    before = state_digest(model_state(model))
    with pytest.raises(ValueError) as raised:
        install_model_state(model, state)
    assert message in str(raised.value)
    assert state_digest(model_state(model)) == before
