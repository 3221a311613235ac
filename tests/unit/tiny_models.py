"""Model specs small enough for tests: each builds in milliseconds and trains a round in
well under a second on a CPU (transformers' import, once per process, is the slowest part)."""

from __future__ import annotations

from typing import Any

from tapestry.training.consortium.models.spec import GPT_TEST, ModelSpec, canonical_json

# A one-block GPT-2 over bytes, as a consortium file's inline [model.hf_config] table. No
# dropout (it would draw from torch's global RNG), and bos/eos inside the byte vocabulary.
HF_TINY_GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 32,
    "vocab_size": 256,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
HF_TINY_SPEC = ModelSpec("hf-causal-lm", 256, hf_config=canonical_json(HF_TINY_GPT2))
# The [model] table of GPT_TEST, as LocalConsortium and consortium files take it.
GPT_TEST_CONFIG: dict[str, Any] = {
    "architecture": "gpt",
    "vocab_size": GPT_TEST.vocab_size,
    "hidden_size": GPT_TEST.hidden_size,
    "n_layers": GPT_TEST.n_layers,
    "n_heads": GPT_TEST.n_heads,
    "context_length": GPT_TEST.context_length,
}
