"""A Hugging Face ``transformers`` config as a consortium file gives it (``[model]`` with
``architecture = "hf-causal-lm"``): read from a local folder, and checked as far as it can be
without importing transformers, so loading a configuration file stays light and fast.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Keys of a transformers config that would fetch or run code from elsewhere.
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")


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
    and byte-capable vocabulary, equal to ``vocab_size``, and asks for no remote code."""
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
