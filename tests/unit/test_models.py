"""The gpt and hf-causal-lm architectures and the canonical model state (tied tensors once)."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open

from tapestry.errors import ModelBuildError, UserError
from tapestry.hf_config import check_hf_config
from tapestry.state_files import load_state, save_state
from tapestry.training.consortium import ModelSpec, TinyCausalModel, state_digest
from tapestry.training.consortium.models.gpt import GPTModel
from tapestry.training.consortium.models.hf_causal_lm import (
    HuggingFaceCausalLM,
    hf_parameter_count,
)
from tapestry.training.consortium.models.spec import GPT_DEMO, GPT_TEST, spec_differences
from tapestry.training.consortium.models.state import load_model_state, model_state, tied_keys

from .tiny_models import HF_TINY_SPEC

TIED = {
    "gpt": ("token_embedding.weight", "lm_head.weight"),
    "hf-causal-lm": ("hf.transformer.wte.weight", "hf.lm_head.weight"),
}
SPECS = pytest.mark.parametrize("spec", [GPT_TEST, HF_TINY_SPEC], ids=["gpt", "hf"])


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied parameter counts once


@SPECS
def test_build_is_the_same_bits_for_the_same_spec_and_seed(spec: ModelSpec) -> None:
    torch.manual_seed(1)
    first = spec.build(11)
    torch.manual_seed(2)
    torch.rand(100)
    second, other = spec.build(11), spec.build(12)

    assert state_digest(model_state(first)) == state_digest(model_state(second))
    assert state_digest(model_state(first)) != state_digest(model_state(other))


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(8)
    torch.manual_seed(1234)
    GPT_TEST.build(99)
    assert torch.equal(torch.rand(8), expected)


def test_gpt_presets_have_the_documented_sizes() -> None:
    test_model, demo_model = GPT_TEST.build(0), GPT_DEMO.build(0)

    assert parameter_count(test_model) == 35_712
    assert parameter_count(demo_model) == 3_257_856
    assert 1_000_000 <= parameter_count(demo_model) <= 10_000_000
    # Tied: the head adds no parameters of its own.
    untied = ModelSpec(**{**GPT_TEST.__dict__, "tie_embeddings": False}).build(0)
    assert parameter_count(untied) == 35_712 + 256 * 32


def test_gpt_forward_is_causal_and_gives_logits_per_position() -> None:
    model = GPT_TEST.build(0)
    input_ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    changed = input_ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256

    logits, after_change = model(input_ids), model(changed)

    assert logits.shape == (2, 10, 256)
    assert torch.equal(logits[:, :7], after_change[:, :7])  # the past never sees the future
    assert not torch.equal(logits[:, 7:], after_change[:, 7:])


def test_gpt_refuses_inputs_past_its_context_length() -> None:
    model = GPT_TEST.build(0)
    with pytest.raises(ValueError, match="65 positions, past context_length = 64"):
        model(torch.zeros((1, 65), dtype=torch.long))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hidden_size": 30, "n_heads": 4}, "hidden_size = 30 is not divisible by n_heads = 4"),
        ({"n_layers": 0}, "gpt needs every size >= 1, got n_layers = 0"),
    ],
)
def test_gpt_config_refuses_impossible_shapes(config: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTModel(**config)  # type: ignore[arg-type]


@SPECS
def test_a_tied_state_holds_the_shared_tensor_once(spec: ModelSpec) -> None:
    model = spec.build(0)
    canonical, alias = TIED[spec.architecture]

    state = model_state(model)

    assert tied_keys(model) == {alias: canonical}
    assert canonical in state and alias not in state
    assert set(model.state_dict()) - set(state) == {alias}


def test_untied_and_tiny_models_keep_their_state_dict() -> None:
    untied = ModelSpec(**{**GPT_TEST.__dict__, "tie_embeddings": False}).build(0)
    tiny = TinyCausalModel()

    assert tied_keys(untied) == {} and list(model_state(untied)) == list(untied.state_dict())
    assert list(model_state(tiny)) == ["embedding.weight", "lm_head.weight", "lm_head.bias"]


@SPECS
def test_loading_a_state_keeps_the_tie(spec: ModelSpec) -> None:
    model, source = spec.build(0), spec.build(1)
    canonical, alias = TIED[spec.architecture]

    load_model_state(model, model_state(source))

    live = dict(model.named_parameters(remove_duplicate=False))
    assert live[alias] is live[canonical]  # still one parameter
    assert torch.equal(live[canonical], model_state(source)[canonical])
    assert state_digest(model_state(model)) == state_digest(model_state(source))


def test_loading_refuses_a_state_with_the_tied_key_too() -> None:
    model = GPT_TEST.build(0)
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight'\]; keys tied to another"):
        load_model_state(model, GPT_TEST.build(1).state_dict())


@SPECS
def test_a_tied_state_is_stored_once_and_loads_back_tied(spec: ModelSpec, tmp_path) -> None:
    trained = spec.build(3)
    canonical, alias = TIED[spec.architecture]
    path = tmp_path / "model.safetensors"

    save_state(path, model_state(trained), {"round_num": "1"})
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())  # noqa: SIM118 - a method, not a dict
    state, _ = load_state(path)
    fresh = spec.build(0)
    load_model_state(fresh, state)

    assert canonical in stored and alias not in stored
    live = dict(fresh.named_parameters(remove_duplicate=False))
    assert live[alias] is live[canonical]
    assert state_digest(model_state(fresh)) == state_digest(model_state(trained))


def test_hf_model_returns_a_logits_tensor() -> None:
    model = HF_TINY_SPEC.build(0)
    assert isinstance(model, HuggingFaceCausalLM)
    assert (model.vocab_size, model.context_length) == (256, 64)

    logits = model(torch.zeros((2, 5), dtype=torch.long))

    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5, 256)


def test_hf_build_names_an_unknown_model_type() -> None:
    spec = ModelSpec("hf-causal-lm", 256, hf_config='{"model_type":"no-such","vocab_size":256}')
    with pytest.raises(ValueError, match="transformers cannot build model_type 'no-such'"):
        spec.build(0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("gpt-9"), "unknown model architecture 'gpt-9'"),
        (ModelSpec(n_layers=4), "n_layers does not apply to architecture 'tiny-causal'"),
        (
            ModelSpec("hf-causal-lm", 256, hidden_size=64, hf_config='{"vocab_size":256}'),
            "hidden_size does not apply to architecture 'hf-causal-lm'",
        ),
        (
            ModelSpec("hf-causal-lm", 300, hf_config='{"vocab_size":256}'),
            "hf_config vocab_size 256 differs from vocab_size 300",
        ),
        (ModelSpec("hf-causal-lm", 256, hf_config="{"), "hf_config is not JSON text"),
    ],
)
def test_a_spec_that_cannot_be_built_says_why(spec: ModelSpec, message: str) -> None:
    assert any(message in problem for problem in spec.problems())
    with pytest.raises(ValueError, match=message):
        spec.build(0)


def test_spec_differences_name_each_field_briefly() -> None:
    wide = ModelSpec(**{**GPT_TEST.__dict__, "hidden_size": 48})
    assert spec_differences(wide, GPT_TEST) == ["hidden_size=48 (expected hidden_size=32)"]
    other = ModelSpec("hf-causal-lm", 256, hf_config='{"vocab_size":256}')
    (difference,) = spec_differences(other, HF_TINY_SPEC)
    assert (
        difference.startswith("hf_config sha256 ") and "(expected hf_config sha256 " in difference
    )
    assert spec_differences(GPT_TEST, GPT_TEST) == []


def test_without_transformers_an_hf_spec_names_the_extra_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if absent
    with pytest.raises(ModelBuildError, match=r"pip install 'tapestry-consortium\[hf\]'") as error:
        HF_TINY_SPEC.build(0)
    assert isinstance(error.value, UserError)  # the CLI prints it as one line


HUGE_LLAMA = (
    '{"hidden_size":65536,"intermediate_size":200000,"model_type":"llama",'
    '"num_attention_heads":64,"num_hidden_layers":80,"vocab_size":256}'
)


def test_an_hf_model_is_counted_on_the_meta_device_before_it_is_built() -> None:
    # 4.5 trillion parameters: counted from shapes (no memory), then refused before build
    assert hf_parameter_count(HUGE_LLAMA) == 4_520_161_640_448
    with pytest.raises(ModelBuildError, match="more than MAX_MODEL_PARAMS = 68,719,476,736"):
        ModelSpec("hf-causal-lm", 256, hf_config=HUGE_LLAMA).build(0)
    # a tied model counts its shared tensor once, as its state holds it
    built = HF_TINY_SPEC.build(0)
    assert hf_parameter_count(HF_TINY_SPEC.hf_config) == sum(p.numel() for p in built.parameters())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_hidden_layers": 1_000_000}, "hf_config num_hidden_layers = 1,000,000 is more"),
        ({"n_layer": 1025}, "hf_config n_layer = 1,025 is more than 1,024"),
        ({"num_attention_heads": 4096}, "hf_config num_attention_heads = 4,096 is more"),
        ({"num_local_experts": 100_000}, "hf_config num_local_experts = 100,000 is more"),
        (
            {"text_config": {"num_hidden_layers": 5000}},
            "hf_config text_config.num_hidden_layers = 5,000 is more",
        ),
    ],
)
def test_counts_that_build_a_module_each_are_bounded_before_transformers_is_asked(
    config: dict[str, object], message: str
) -> None:
    table = {"model_type": "llama", "vocab_size": 256, **config}
    with pytest.raises(ValueError, match=message):
        check_hf_config(table, 256)
    check_hf_config({"model_type": "llama", "vocab_size": 256, "num_hidden_layers": 1024}, 256)


def test_sizes_named_like_counts_are_not_bounded_as_counts() -> None:
    # Qwen2-MoE's shared expert width and a head's width are sizes, not module counts
    check_hf_config(
        {
            "model_type": "qwen2_moe",
            "vocab_size": 256,
            "shared_expert_intermediate_size": 5632,
            "head_dim": 4096,
            "decoder_layers": 24,
        },
        256,
    )
    with pytest.raises(ValueError, match="decoder_layers = 2,048 is more than 1,024"):
        check_hf_config({"model_type": "bart", "vocab_size": 256, "decoder_layers": 2048}, 256)


@pytest.mark.parametrize(
    "patch",
    [
        {"n_head": 0},  # transformers divides by it: ZeroDivisionError
        {"n_layer": 2.0},  # huggingface_hub's strict dataclass error, not a ValueError
        {"n_positions": -5},  # torch refuses a negative dimension: RuntimeError
    ],
    ids=["zero-heads", "float-layers", "negative-positions"],
)
def test_a_config_transformers_cannot_count_is_a_build_error_and_a_node_refuses_it(
    patch: dict[str, object],
) -> None:
    import json

    from tapestry.node.dial_out import SessionClosedForGood, _buildable, _within

    fields = {"model_type": "gpt2", "vocab_size": 256, "n_embd": 32, "n_layer": 2, "n_head": 2}
    settings = {**fields, "n_positions": 64, **patch}
    config = json.dumps(settings, sort_keys=True, separators=(",", ":"))  # canonical
    with pytest.raises(ModelBuildError, match="transformers cannot build model_type 'gpt2'"):
        hf_parameter_count(config)
    # a coordinator's welcome with it: the node refuses it in words, it does not crash
    spec, table = _buildable(ModelSpec("hf-causal-lm", 256, hf_config=config))
    with pytest.raises(SessionClosedForGood, match="the coordinator's model cannot be built"):
        _within(spec, table, 10**9)
