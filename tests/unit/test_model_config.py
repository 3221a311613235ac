"""The [model] section: each architecture's fields, checked when the file is loaded."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tapestry.config import (
    ConfigError,
    ConsortiumConfig,
    ModelTable,
    NodeConfig,
    build_config,
    context_length_limit,
    load_config,
    write_config,
)
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium.models.spec import GPT_TEST, ModelSpec
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.tensors import state_digest, state_layout
from tapestry.wire.codec import (
    model_spec_from_proto,
    model_spec_to_proto,
    state_layout_from_proto,
    state_layout_to_proto,
)

from .tiny_models import GPT_TEST_CONFIG, HF_TINY_GPT2, HF_TINY_SPEC

HF = {"architecture": "hf-causal-lm", "hf_config": HF_TINY_GPT2}


def model_config(raw: dict[str, Any]) -> ModelTable:
    return build_config(ModelTable, raw, "consortium.toml")


def test_tiny_causal_stays_the_default_with_the_identity_it_always_had() -> None:
    config = model_config({})
    assert config.spec() == ModelSpec("tiny-causal", 256, 32)
    # What the coordinator's data directory records as its model.
    assert config.model_dump(mode="json", exclude_none=True) == {
        "architecture": "tiny-causal",
        "vocab_size": 256,
        "hidden_size": 32,
    }


def test_gpt_fields_have_defaults_and_build_the_spec() -> None:
    assert model_config({"architecture": "gpt"}).spec() == ModelSpec("gpt", 256, 32)
    assert model_config(GPT_TEST_CONFIG).spec() == GPT_TEST
    untied = model_config({**GPT_TEST_CONFIG, "tie_embeddings": False}).spec()
    assert untied.tie_embeddings is False


def test_hf_config_inline_gives_canonical_json_and_its_vocab_size() -> None:
    config = model_config(HF)
    assert config.spec() == HF_TINY_SPEC
    assert config.vocab_size == 256 and context_length_limit(config.spec()) == 64
    reordered = model_config({**HF, "hf_config": dict(reversed(HF_TINY_GPT2.items()))})
    assert reordered.spec() == HF_TINY_SPEC


def test_hf_config_dir_is_read_at_load_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "tiny-gpt2").mkdir()
    saved = {**HF_TINY_GPT2, "n_inner": None, "transformers_version": "5.24.0"}
    (tmp_path / "tiny-gpt2" / "config.json").write_text(json.dumps(saved))
    path = tmp_path / "consortium.toml"
    path.write_text(
        'consortium_id = "c"\n'
        "[model]\n"
        'architecture = "hf-causal-lm"\n'
        'hf_config_dir = "tiny-gpt2"\n'
        "[[nodes]]\n"
        'node_id = "vn"\njurisdiction = "Vietnam"\naddress = "127.0.0.1:1"\n'
        "[policy]\nmax_node_weight = 1.0\n"
    )

    config = load_config(path, ConsortiumConfig)

    assert config.model.hf_config is not None
    assert "n_inner" not in config.model.hf_config  # null: the model type's default
    expected = ModelSpec(
        "hf-causal-lm",
        256,
        hf_config=json.dumps(
            {**HF_TINY_GPT2, "transformers_version": "5.24.0"},
            sort_keys=True,
            separators=(",", ":"),
        ),
    )
    assert config.model == expected


@pytest.mark.parametrize("raw", [GPT_TEST_CONFIG, HF], ids=["gpt", "hf"])
def test_a_written_model_section_loads_back_equal(raw: dict[str, Any], tmp_path: Path) -> None:
    config = build_config(
        ConsortiumConfig,
        {
            "consortium_id": "c",
            "model": raw,
            "nodes": [{"node_id": "vn", "jurisdiction": "Vietnam", "address": "127.0.0.1:1"}],
            "policy": {"max_node_weight": 1.0},
        },
        "test",
    )
    loaded = load_config(write_config(tmp_path / "c.toml", config), ConsortiumConfig)
    assert loaded == config and loaded.model == config.model


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"n_layers": 2}, "n_layers does not apply to architecture 'tiny-causal'; remove it"),
        (
            {"architecture": "gpt", "hidden_size": 30, "n_heads": 4},
            "hidden_size = 30 is not divisible by n_heads = 4",
        ),
        (
            {"architecture": "gpt", "vocab_size": 100},
            "vocab_size = 100 cannot hold byte tokens (0..255)",
        ),
        (
            {"architecture": "gpt", "n_layers": 0},
            "n_layers: Input should be greater than or equal to 1",
        ),
        (
            {"architecture": "gpt", "hf_config": HF_TINY_GPT2},
            "hf_config does not apply to architecture 'gpt'",
        ),
        (
            {"architecture": "hf-causal-lm"},
            "'hf-causal-lm' needs hf_config (an inline table) or hf_config_dir",
        ),
        ({**HF, "n_heads": 2}, "n_heads does not apply to architecture 'hf-causal-lm'"),
        ({**HF, "vocab_size": 300}, "vocab_size = 300 differs from hf_config vocab_size = 256"),
        (
            {**HF, "hf_config": {**HF_TINY_GPT2, "vocab_size": 100}},
            "vocab_size = 100 cannot hold byte tokens",
        ),
        ({**HF, "hf_config": {"vocab_size": 256}}, "hf_config needs model_type"),
        ({**HF, "hf_config": {"model_type": "gpt2"}}, "hf_config needs vocab_size (at least 256"),
        (
            {**HF, "hf_config": {**HF_TINY_GPT2, "trust_remote_code": True}},
            "hf_config sets trust_remote_code: code from a model repository is never run",
        ),
        (
            {**HF, "hf_config": {**HF_TINY_GPT2, "auto_map": {"AutoModelForCausalLM": "x.Y"}}},
            "hf_config sets auto_map",
        ),
        ({**HF, "hf_config_dir": "/x"}, "give hf_config (inline) or hf_config_dir, not both"),
        (
            {"architecture": "gpt", "hf_config_dir": "/x"},
            "hf_config_dir applies to architecture 'hf-causal-lm' only",
        ),
        (
            {"architecture": "hf-causal-lm", "hf_config_dir": "/no/such/dir"},
            "/no/such/dir/config.json not found; give a local folder",
        ),
    ],
)
def test_a_model_section_that_cannot_work_is_refused_with_the_fix(
    raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        model_config(raw)
    assert message in str(error.value)


def test_a_node_window_longer_than_the_context_is_refused() -> None:
    node = {
        "node_id": "vn",
        "jurisdiction": "Vietnam",
        "consortium_id": "c",
        "quality_score": 0.9,
        "corpus": ["corpus.txt"],
        "model": GPT_TEST_CONFIG,
    }
    assert build_config(NodeConfig, {**node, "training": {"max_seq_len": 65}}, "n").model
    with pytest.raises(
        ConfigError,
        match=r"max_seq_len = 66 gives inputs of 65 positions, past the model's context length 64; set max_seq_len to at most 65",
    ):
        build_config(NodeConfig, {**node, "training": {"max_seq_len": 66}}, "node.toml")


@pytest.mark.parametrize(
    "spec",
    [ModelSpec(), ModelSpec("tiny-causal", 259, 48), GPT_TEST, HF_TINY_SPEC],
    ids=["tiny-default", "tiny", "gpt", "hf"],
)
def test_every_spec_round_trips_through_its_proto(spec: ModelSpec) -> None:
    msg = model_spec_to_proto(spec)
    assert model_spec_from_proto(pb.ModelSpec.FromString(msg.SerializeToString())) == spec


def test_a_state_layout_round_trips_through_its_proto() -> None:
    layout = state_layout(model_state(GPT_TEST.build(0)))
    msg = state_layout_to_proto(layout)
    assert state_layout_from_proto(pb.StateLayout.FromString(msg.SerializeToString())) == layout
    assert (layout.tensor_count, layout.element_count) == (28, 35_712)


MODELS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "concepts" / "models.md"


def documented_model_examples() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", MODELS_PAGE.read_text(encoding="utf-8"), re.S)


def test_the_documented_model_examples_load_and_have_the_sizes_they_claim() -> None:
    examples = documented_model_examples()
    assert len(examples) == 3
    for example in examples:
        config = model_config(tomllib.loads(example)["model"])
        claimed = re.search(r"([\d,]+) parameters", example)
        if claimed:
            model = config.spec().build(0)
            count = sum(p.numel() for p in model.parameters())
            assert count == int(claimed.group(1).replace(",", "")), example
    assert config.architecture == "hf-causal-lm" and config.spec().vocab_size == 256


def test_a_folder_saved_by_transformers_builds_the_same_model_as_its_inline_table(
    tmp_path: Path,
) -> None:
    from transformers import AutoConfig

    fields = {k: v for k, v in HF_TINY_GPT2.items() if k != "model_type"}
    AutoConfig.for_model("gpt2", **fields).save_pretrained(tmp_path / "tiny-gpt2")

    from_dir = model_config(
        {"architecture": "hf-causal-lm", "hf_config_dir": str(tmp_path / "tiny-gpt2")}
    )
    model = from_dir.spec().build(0)

    inline = HF_TINY_SPEC.build(0)
    assert state_layout(model_state(model)) == state_layout(model_state(inline))
    assert state_digest(model_state(model)) == state_digest(model_state(inline))  # same init
    assert from_dir.vocab_size == 256 and context_length_limit(from_dir.spec()) == 64
