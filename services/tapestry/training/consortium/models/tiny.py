"""The proof of concept's model: embedding -> linear next-token model over byte tokens."""

from __future__ import annotations

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
