"""TinyCausalModel and ModelSpec: the proof of concept's model and a seeded first base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tapestry.training.consortium import ModelSpec, TinyCausalModel, state_digest


def test_tiny_causal_model_defaults() -> None:
    model = TinyCausalModel()

    assert isinstance(model, nn.Module)
    assert (model.vocab_size, model.hidden_size) == (256, 32)
    assert isinstance(model.embedding, nn.Embedding)
    assert isinstance(model.lm_head, nn.Linear)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == {
        "embedding.weight": (256, 32),
        "lm_head.weight": (256, 32),
        "lm_head.bias": (256,),
    }


def test_forward_gives_logits_per_position_over_the_vocabulary() -> None:
    model = TinyCausalModel(vocab_size=50, hidden_size=8)
    input_ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 49, 7, 7]])  # (B=2, T=5)

    logits = model(input_ids)

    assert logits.shape == (2, 5, 50)
    assert logits.dtype == torch.float32
    # embedding -> linear: each position's logits depend on its own token only
    expected = model.lm_head(model.embedding(input_ids))
    assert torch.equal(logits, expected)
    assert torch.equal(logits[1, 3], logits[1, 4])


@pytest.mark.parametrize(("vocab_size", "hidden_size"), [(0, 32), (256, 0)])
def test_tiny_causal_model_refuses_empty_dimensions(vocab_size: int, hidden_size: int) -> None:
    with pytest.raises(ValueError, match="vocab_size and hidden_size must be >= 1"):
        TinyCausalModel(vocab_size, hidden_size)


def test_model_spec_build_is_the_same_bits_for_the_same_seed() -> None:
    spec = ModelSpec(vocab_size=64, hidden_size=16)

    first, second = spec.build(11), spec.build(11)
    other = spec.build(12)

    assert isinstance(first, TinyCausalModel)
    assert (first.vocab_size, first.hidden_size) == (64, 16)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert state_digest(first.state_dict()) == state_digest(second.state_dict())
    assert state_digest(first.state_dict()) != state_digest(other.state_dict())


def test_model_spec_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(8)

    torch.manual_seed(1234)
    ModelSpec().build(99)
    after_build = torch.rand(8)

    assert torch.equal(after_build, expected)


def test_model_spec_build_does_not_depend_on_the_global_rng() -> None:
    torch.manual_seed(1)
    first = ModelSpec().build(5)
    torch.manual_seed(2)
    torch.rand(100)
    second = ModelSpec().build(5)

    assert state_digest(first.state_dict()) == state_digest(second.state_dict())


def test_model_spec_refuses_an_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown model architecture 'gpt-9'"):
        ModelSpec(architecture="gpt-9").build(0)
