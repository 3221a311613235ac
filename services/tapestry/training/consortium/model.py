"""The proof of concept's model and a seeded way to build a consortium's first base."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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


@dataclass(frozen=True)
class ModelSpec:
    """What every member of a consortium agrees to train."""

    architecture: str = "tiny-causal"
    vocab_size: int = 256
    hidden_size: int = 32

    def build(self, seed: int) -> nn.Module:
        """A freshly initialised model, the same bits for the same spec and seed.

        The global RNG is forked, not consumed, so building a model never perturbs the
        caller's random stream.
        """
        if self.architecture != "tiny-causal":
            raise ValueError(
                f"unknown model architecture {self.architecture!r}; supported: 'tiny-causal'"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return TinyCausalModel(self.vocab_size, self.hidden_size)
