"""The spec every member of a consortium builds its model from: the one type for it (the
configuration's ``[model]`` section parses into it, the wire's ``ModelSpec`` mirrors it).

Architectures (``ModelSpec.architecture``):

- ``tiny-causal``: the proof of concept's :class:`~.tiny.TinyCausalModel` (the default);
- ``gpt``: :class:`~.gpt.GPTModel`, a small byte-level transformer written here;
- ``hf-causal-lm``: a ``transformers`` causal LM built from ``hf_config``
  (:mod:`~.hf_causal_lm`; the optional ``hf`` extra).

This module imports no torch until a model is built, so a configuration is checked without
it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from tapestry.errors import ModelBuildError

if TYPE_CHECKING:
    from torch import nn


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
            except RecursionError:  # a hostile spec nested past what the parser can follow
                return [*out, "hf_config nests too deep to be a transformers config"]
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
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _build(self)

    def digest(self) -> str:
        """SHA-256 (hex) of the spec's canonical JSON: what a node pins (``model_sha256``)
        and a session's welcome carries, equal on every member for equal specs."""
        fields_json = canonical_json({f.name: getattr(self, f.name) for f in fields(self)})
        return hashlib.sha256(fields_json.encode()).hexdigest()

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


def _build(spec: ModelSpec) -> nn.Module:
    """The model of ``spec``'s architecture, drawn from torch's global RNG."""
    if spec.architecture == "gpt":
        from tapestry.training.consortium.models.gpt import GPTModel

        return GPTModel(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            n_layers=spec.n_layers,
            n_heads=spec.n_heads,
            context_length=spec.context_length,
            tie_embeddings=spec.tie_embeddings,
        )
    if spec.architecture == "hf-causal-lm":
        from tapestry.training.consortium.models.hf_causal_lm import HuggingFaceCausalLM

        return HuggingFaceCausalLM(spec.hf_config)
    from tapestry.training.consortium.models.tiny import TinyCausalModel

    return TinyCausalModel(spec.vocab_size, spec.hidden_size)


# gpt sizes: the test preset trains in well under a second; the demo preset (about 3.3M
# parameters) learns the demo corpora on a CPU in minutes.
GPT_TEST = ModelSpec("gpt", 256, 32, n_layers=2, n_heads=2, context_length=64)
GPT_DEMO = ModelSpec("gpt", 256, 256, n_layers=4, n_heads=4, context_length=128)
