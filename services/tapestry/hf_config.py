"""A Hugging Face ``transformers`` config as a consortium file gives it (``[model]`` with
``architecture = "hf-causal-lm"``): read from a local folder, and checked as far as it can be
without importing transformers, so loading a configuration file stays light and fast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tapestry.limits import MAX_HEADS, MAX_LAYERS

# Keys of a transformers config that would fetch or run code from elsewhere.
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")
# Counts of which a model builds one module per unit (blocks, heads, experts), known by
# their names (``num_hidden_layers``, ``n_head``, ``n_routed_experts``, ``decoder_layers``;
# not ``head_dim`` or ``shared_expert_intermediate_size``, which are sizes): each is bounded
# (limits.MAX_LAYERS, MAX_HEADS), because building a model, even on torch's meta device to
# count its parameters, makes Python objects for each (10,000 layers: ~20 s and 300 MiB
# before a single weight).
COUNT_WORDS = {"layer": MAX_LAYERS, "head": MAX_HEADS, "expert": MAX_LAYERS}
# Tables within tables a config may hold (a multimodal model's text_config is one level).
MAX_HF_CONFIG_DEPTH = 8


def read_hf_config_dir(directory: Path) -> dict[str, Any]:
    """The ``config.json`` in ``directory`` (as ``save_pretrained`` writes it)."""
    path = directory / "config.json"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"hf_config_dir: {path} not found; give a local folder holding a transformers "
            "config.json (as save_pretrained writes it)"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"hf_config_dir: cannot read {path} as JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(
            f"hf_config_dir: {path} holds a JSON {type(loaded).__name__}, not an object"
        )
    return loaded


def check_hf_config(config: Mapping[str, Any] | None, vocab_size: int) -> None:
    """What can be checked without importing transformers: present, names its model type
    and byte-capable vocabulary, equal to ``vocab_size``, asks for no remote code, and no
    count of blocks, heads or experts past its bound (:data:`COUNT_WORDS`)."""
    if config is None:
        raise ValueError(
            "architecture 'hf-causal-lm' needs hf_config (an inline table) or hf_config_dir "
            "(a local folder with config.json)"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError('hf_config needs model_type, a transformers model type such as "gpt2"')
    remote = [key for key in REMOTE_CODE_KEYS if key in config]
    if remote:
        raise ValueError(
            f"hf_config sets {', '.join(remote)}: code from a model repository is never run "
            "here; use a model type that transformers itself provides"
        )
    if _depth(config) > MAX_HF_CONFIG_DEPTH:
        raise ValueError(
            f"hf_config nests more than {MAX_HF_CONFIG_DEPTH} tables deep: no transformers "
            "config does"
        )
    for name, value, bound in _counts(config):
        if value > bound:
            raise ValueError(
                f"hf_config {name} = {value:,} is more than {bound:,}: a model builds one "
                "module for each"
            )
    vocab = config.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int):
        raise ValueError(
            "hf_config needs vocab_size (at least 256 for byte corpora): the model type's "
            "default vocabulary is not the byte one"
        )
    if vocab != vocab_size:
        raise ValueError(
            f"vocab_size = {vocab_size} differs from hf_config vocab_size = {vocab}; "
            "leave vocab_size out, the config's is used"
        )


def _counts(config: Mapping[str, Any], within: str = "") -> list[tuple[str, int, int]]:
    """Every integer of ``config`` (nested ones too, named ``outer.inner``) whose name says
    it counts blocks, heads or experts, with its bound."""
    found: list[tuple[str, int, int]] = []
    for key, value in config.items():
        name = f"{within}{key}"
        if isinstance(value, Mapping):
            found.extend(_counts(value, f"{name}."))
        elif isinstance(value, int) and not isinstance(value, bool):
            lowered = key.lower()
            for word, bound in COUNT_WORDS.items():
                counted = lowered.startswith(("num_", "n_")) or lowered.endswith(f"{word}s")
                if word in lowered and counted:
                    found.append((name, value, bound))
                    break
    return found


def _depth(config: Any) -> int:
    """How many tables deep ``config`` nests (lists count as levels too), without recursion."""
    deepest, stack = 0, [(config, 1)]
    while stack:
        value, level = stack.pop()
        children = value.values() if isinstance(value, Mapping) else value
        if isinstance(value, Mapping | list):
            deepest = max(deepest, level)
            if level <= MAX_HF_CONFIG_DEPTH:  # past the bound, deeper is refused the same
                stack.extend((child, level + 1) for child in children)
    return deepest
