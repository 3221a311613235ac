"""The models a consortium can train, the spec every member builds its model from, and the
one canonical *model state* that crosses the core, the wire and the disk.

Architectures (``ModelSpec.architecture``):

- ``tiny-causal``: the proof of concept's :class:`TinyCausalModel` (the default);
- ``gpt``: :class:`~tapestry.training.consortium.gpt.GPTModel`, a small byte-level
  transformer written here;
- ``hf-causal-lm``: a ``transformers`` causal LM built from ``hf_config``
  (:mod:`tapestry.training.consortium.hf_causal_lm`; the optional ``hf`` extra).

**Model state.** A ``state_dict`` lists a tied tensor (an embedding shared with the output
head) once per key, and a per-key delta would then apply the shared update twice (and
safetensors refuses to store it). :func:`model_state` keeps every tensor once, under the
first key that names it (the embedding's, in the models here); :func:`load_model_state`
loads such a state and keeps the tie. Every state a node trains from, returns, stores, or
that the coordinator integrates, is a model state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from tapestry.errors import UserError
from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.tensors import few_names


class ModelBuildError(UserError, ValueError):
    """A spec this process cannot build (a field out of place, a missing optional install);
    the message names the field or the fix."""


class TinyCausalModel(nn.Module):
    """Embedding -> linear next-token model over byte tokens (the proof of concept's)."""

    def __init__(self, vocab_size: int = 256, hidden_size: int = 32) -> None:
        super().__init__()
        if vocab_size < 1 or hidden_size < 1:
            raise ValueError(
                f"vocab_size and hidden_size must be >= 1, got {vocab_size} and {hidden_size}"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.embedding(input_ids)  # (B, T, H)
        logits: torch.Tensor = self.lm_head(hidden)  # (B, T, V)
        return logits


# Which spec fields each architecture reads; the others must stay at their defaults, so two
# specs of the same model are equal (and a member cannot differ in a field nobody reads).
ARCHITECTURE_FIELDS: dict[str, tuple[str, ...]] = {
    "tiny-causal": ("vocab_size", "hidden_size"),
    "gpt": ("vocab_size", "hidden_size", "n_layers", "n_heads", "context_length", "tie_embeddings"),
    "hf-causal-lm": ("vocab_size", "hf_config"),
}


@dataclass(frozen=True)
class ModelSpec:
    """What every member of a consortium agrees to train: the coordinator and every node
    build their model from it, and a node describing another spec gets no weights.

    ``ModelSpec("tiny-causal", 256, 32)`` is the proof of concept's. The fields after
    ``hidden_size`` are the transformers' (:data:`ARCHITECTURE_FIELDS` says which
    architecture reads which); ``hf_config`` is the ``transformers`` config as canonical
    JSON text (:func:`canonical_json`), its ``vocab_size`` equal to the spec's.
    """

    architecture: str = "tiny-causal"
    vocab_size: int = 256
    hidden_size: int = 32
    n_layers: int = 2
    n_heads: int = 2
    context_length: int = 128
    tie_embeddings: bool = True
    hf_config: str = ""

    def problems(self) -> list[str]:
        """Why this spec cannot be built (empty when it can), each naming the field."""
        if self.architecture not in ARCHITECTURE_FIELDS:
            return [
                f"unknown model architecture {self.architecture[:40]!r}; supported: "
                f"{', '.join(repr(a) for a in ARCHITECTURE_FIELDS)}"
            ]
        used = ARCHITECTURE_FIELDS[self.architecture]
        default = ModelSpec()
        out = [
            f"{f.name} does not apply to architecture {self.architecture!r}; leave it unset"
            for f in fields(self)
            if f.name != "architecture"
            and f.name not in used
            and getattr(self, f.name) != getattr(default, f.name)
        ]
        if self.architecture == "hf-causal-lm":
            try:
                config = json.loads(self.hf_config)
            except ValueError:
                return [*out, "hf_config is not JSON text (a transformers config)"]
            vocab = config.get("vocab_size") if isinstance(config, dict) else None
            if vocab != self.vocab_size:
                out.append(
                    f"hf_config vocab_size {vocab!r} differs from vocab_size {self.vocab_size}"
                )
        return out

    def build(self, seed: int) -> nn.Module:
        """A freshly initialised model, the same bits for the same spec and seed.

        The global RNG is forked, not consumed, so building a model never perturbs the
        caller's random stream.
        """
        problems = self.problems()
        if problems:
            raise ModelBuildError(f"cannot build model {self.summary()}: {'; '.join(problems)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return BUILDERS[self.architecture](self)

    def summary(self) -> str:
        """The fields that the architecture reads, for people: ``hf_config`` by digest."""
        used = ARCHITECTURE_FIELDS.get(self.architecture, ("vocab_size", "hidden_size"))
        shown = [
            f"hf_config sha256 {hashlib.sha256(self.hf_config.encode()).hexdigest()[:12]}"
            if name == "hf_config"
            else f"{name}={getattr(self, name)}"
            for name in used
        ]
        return f"{self.architecture[:40]}({', '.join(shown)})"


def spec_differences(theirs: ModelSpec, ours: ModelSpec) -> list[str]:
    """Each field in which ``theirs`` differs from ``ours``, as ``"field=theirs (expected
    field=ours)"``; long text (``hf_config``) by digest, a peer's strings cut short."""

    def shown(spec: ModelSpec, name: str) -> str:
        value = getattr(spec, name)
        if name == "hf_config":
            return f"hf_config sha256 {hashlib.sha256(value.encode()).hexdigest()[:12]}"
        return f"{name}={value[:40]!r}" if isinstance(value, str) else f"{name}={value}"

    return [
        f"{shown(theirs, f.name)} (expected {shown(ours, f.name)})"
        for f in fields(ModelSpec)
        if getattr(theirs, f.name) != getattr(ours, f.name)
    ]


def canonical_json(config: Mapping[str, object]) -> str:
    """One text for one config: sorted keys, no spaces, ASCII, so equal configs compare
    equal as specs on every member."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _build_gpt(spec: ModelSpec) -> nn.Module:
    from tapestry.training.consortium.gpt import GPTConfig, GPTModel

    return GPTModel(
        GPTConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            n_layers=spec.n_layers,
            n_heads=spec.n_heads,
            context_length=spec.context_length,
            tie_embeddings=spec.tie_embeddings,
        )
    )


def _build_hf(spec: ModelSpec) -> nn.Module:
    from tapestry.training.consortium.hf_causal_lm import HuggingFaceCausalLM

    return HuggingFaceCausalLM(spec.hf_config)


BUILDERS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "tiny-causal": lambda spec: TinyCausalModel(spec.vocab_size, spec.hidden_size),
    "gpt": _build_gpt,
    "hf-causal-lm": _build_hf,
}

# gpt sizes: the test preset trains in well under a second; the demo preset (about 3.3M
# parameters) learns the demo corpora on a CPU in minutes.
GPT_TEST = ModelSpec("gpt", 256, 32, n_layers=2, n_heads=2, context_length=64)
GPT_DEMO = ModelSpec("gpt", 256, 256, n_layers=4, n_heads=4, context_length=128)


def tied_keys(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for every state key whose tensor is exactly one listed under
    an earlier key (same memory, dtype, shape and strides): the ties :func:`model_state`
    leaves out. Partly overlapping views are not ties and stay separate keys."""
    first: dict[tuple[object, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if identity in first:
            aliases[name] = first[identity]
        else:
            first[identity] = name
    return aliases


def model_state(model: nn.Module) -> ModelState:
    """The model's canonical state: its ``state_dict`` with each tied tensor once, under its
    first key. Tensors are the model's own (not copies), detached."""
    aliases = tied_keys(model)
    return {name: t for name, t in model.state_dict().items() if name not in aliases}


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a canonical state (:func:`model_state`'s keys exactly) into ``model``; tied
    tensors stay one tensor. Raises ``ValueError`` naming missing or unexpected keys."""
    aliases = tied_keys(model)
    expected = [name for name in model.state_dict() if name not in aliases]
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        tied = "; keys tied to another are left out" if set(extra) & set(aliases) else ""
        raise ValueError(
            f"state keys differ from the model's: missing {few_names(missing)}, "
            f"unexpected {few_names(extra)}{tied}"
        )
    full = dict(state)
    for alias, canonical in aliases.items():
        full[alias] = state[canonical]  # the same value into the same parameter
    model.load_state_dict(full)


def install_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Make ``state``'s tensors the model's own parameters and buffers, without a copy: a
    state the caller hands over (and no longer edits) replaces the model's in place of
    :func:`load_model_state`'s copy into it; the tensors it had are left to whoever else
    holds them. Keys as for :func:`load_model_state`; each tensor must have its
    counterpart's dtype and shape (``ValueError`` otherwise, and the model is unchanged)."""
    aliases = tied_keys(model)
    current = model.state_dict(keep_vars=True)
    expected = [name for name in current if name not in aliases]
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"state keys differ from the model's: missing {few_names(missing)}, "
            f"unexpected {few_names(extra)}"
        )
    for name in expected:
        have, given = current[name], state[name]
        if have.dtype != given.dtype or have.shape != given.shape:
            raise ValueError(
                f"{name!r}: the model holds {have.dtype} {tuple(have.shape)}, the state "
                f"{given.dtype} {tuple(given.shape)}"
            )
    for name, tensor in current.items():
        tensor.data = state[aliases.get(name, name)].detach()
