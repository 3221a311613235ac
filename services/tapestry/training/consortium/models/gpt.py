"""``gpt``: a small decoder-only byte-level transformer, written here in the nanoGPT manner.

Learned positional embeddings, pre-LayerNorm blocks (causal self-attention, then an MLP),
a final LayerNorm and a linear head. With ``tie_embeddings`` the head's weight *is* the
token embedding (GPT-2's choice: fewer parameters, and the input and output views of a
byte agree); :func:`~tapestry.training.consortium.models.state.model_state` keeps such a tensor
once, so a shared update is applied once and stored once.

No dropout: a node draws every random number from its own seeded generator (DESIGN §2),
and dropout would draw from torch's global one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(batch, time, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, C / heads)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(batch, time, width))
        return out


class MLP(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden_size, 4 * hidden_size)
        self.proj = nn.Linear(4 * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(F.gelu(self.fc(x)))
        return out


class Block(nn.Module):
    """Pre-LayerNorm: normalise, transform, add back (the residual stream stays unscaled)."""

    def __init__(self, hidden_size: int, n_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_size)
        self.attn = CausalSelfAttention(hidden_size, n_heads)
        self.ln_2 = nn.LayerNorm(hidden_size)
        self.mlp = MLP(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class GPTModel(nn.Module):
    """``forward(input_ids[B, T]) -> logits[B, T, V]`` with ``T <= context_length``: the
    same interface as :class:`~tapestry.training.consortium.models.tiny.TinyCausalModel`, so a
    node trains either unchanged.

    Initialised as GPT-2: weights N(0, 0.02), biases 0, LayerNorms 1/0, and each residual
    projection scaled by ``1/sqrt(2 * n_layers)`` so the residual stream's variance does
    not grow with depth. Every draw is from torch's global RNG, which
    :meth:`ModelSpec.build` seeds (and forks, so the caller's stream is untouched).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        hidden_size: int = 32,
        n_layers: int = 2,
        n_heads: int = 2,
        context_length: int = 128,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        _check_shape(vocab_size, hidden_size, n_layers, n_heads, context_length)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.context_length = context_length
        # Declared before the head, so the tied tensor's first (canonical) key is the
        # embedding's: "token_embedding.weight".
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(context_length, hidden_size)
        self.blocks = nn.ModuleList(Block(hidden_size, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * n_layers)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        time = input_ids.shape[1]
        if time > self.context_length:
            raise ValueError(
                f"gpt input has {time} positions, past context_length = {self.context_length}; "
                "cut sequences to the context length (training.max_seq_len <= context_length + 1)"
            )
        positions = torch.arange(time, device=input_ids.device)  # (T,)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits


def _check_shape(
    vocab_size: int, hidden_size: int, n_layers: int, n_heads: int, context_length: int
) -> None:
    """Every size at least 1, and ``hidden_size`` divisible by ``n_heads``."""
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "context_length": context_length,
    }
    small = [f"{name} = {value}" for name, value in sizes.items() if value < 1]
    if small:
        raise ValueError(f"gpt needs every size >= 1, got {', '.join(small)}")
    if hidden_size % n_heads:
        raise ValueError(
            f"gpt hidden_size = {hidden_size} is not divisible by n_heads = {n_heads}; "
            "each head takes an equal slice of the width"
        )
