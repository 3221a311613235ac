"""``hf-causal-lm``: a Hugging Face ``transformers`` causal LM built from a config alone.

The config is the consortium's (inline in its file, or read from a local directory when the
file is loaded): the model is built with ``AutoModelForCausalLM.from_config``, initialised
from torch's seeded RNG, so nothing is downloaded and no code from a model repository runs
(``trust_remote_code`` is refused before this module is reached). ``transformers`` is an
optional install (the ``hf`` extra), imported only when such a model is built.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from tapestry.errors import ModelBuildError
from tapestry.limits import MAX_MODEL_PARAMS

INSTALL_HINT = "install the optional extra: pip install 'tapestry-consortium[hf]'"


def hf_parameter_count(config_json: str) -> int:
    """The parameters the model of ``config_json`` holds (each tied tensor once), counted
    on torch's meta device: its shapes, no memory, so a config too large to build is
    refused before anything is allocated. 0 when ``transformers`` is not installed (the
    build then says what to install); :class:`ModelBuildError` for a config it cannot build.
    """
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return 0
    return _meta_count(AutoModelForCausalLM, _config(config_json))


def _meta_count(auto: Any, config: Any) -> int:
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=False)
    except Exception as error:  # a head count of 0 divides by zero, a negative size is
        # torch's RuntimeError: whatever a config makes transformers raise, it is refused
        raise ModelBuildError(
            f"hf_config: transformers cannot build model_type {config.model_type!r}: "
            f"{type(error).__name__}: {error}"
        ) from None
    return sum(parameter.numel() for parameter in model.parameters())  # unique: ties once


def _config(config_json: str) -> Any:
    """The ``transformers`` config of ``config_json`` (its ``model_type`` picks the class)."""
    from transformers import AutoConfig

    fields: dict[str, Any] = json.loads(config_json)
    model_type = fields.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as error:  # huggingface_hub's strict field checks are no ValueError
        raise ModelBuildError(
            f"hf_config: transformers cannot build model_type {model_type!r}: {error}"
        ) from None


class HuggingFaceCausalLM(nn.Module):
    """``forward(input_ids[B, T]) -> logits[B, T, V]`` around a ``transformers`` causal LM
    (which returns an output object), so a node trains it as it trains any model here.

    The wrapped model is ``self.hf``: state keys are the library's own prefixed with
    ``hf.`` (strip it to load a state into a bare ``transformers`` model). Models that tie
    their input embedding to the output head (GPT-2 does) keep the tie; see
    :func:`~tapestry.training.consortium.models.state.model_state`.
    """

    def __init__(self, config_json: str) -> None:
        super().__init__()
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as error:
            raise ModelBuildError(
                f"model architecture 'hf-causal-lm' needs transformers ({error}); {INSTALL_HINT}"
            ) from None
        config = _config(config_json)
        params = _meta_count(AutoModelForCausalLM, config)  # before any memory is taken
        if params > MAX_MODEL_PARAMS:
            raise ModelBuildError(
                f"hf_config: the model would hold {params:,} parameters, more than "
                f"MAX_MODEL_PARAMS = {MAX_MODEL_PARAMS:,}"
            )
        # transformers leaves from_config untyped; it returns a PreTrainedModel (a Module).
        self.hf: nn.Module = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=False
        )
        self.vocab_size: int = config.vocab_size
        # GPT-2 calls it n_positions; transformers maps the common name onto it.
        self.context_length: int | None = getattr(config, "max_position_embeddings", None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.hf(input_ids=input_ids, use_cache=False).logits
        return logits
