"""Known answers: what a digest means must never change between releases.

A journal keeps ``state_digest`` values for every base (and the strategy's state) it
commits, and a restart checks the files against them; a release that silently changed the
digest, or the bits a round makes, would make every old journal unreadable or different. The
values below were computed at commit 150276e (before the core moved into rooms) and again
after it: the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tapestry.config import model_from_table, model_table
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    ModelSpec,
    SovereignTrainingNode,
    TinyCausalModel,
    state_digest,
)


def fixed_state() -> dict[str, torch.Tensor]:
    return {
        "embedding.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
        "lm_head.bias": torch.tensor([-1.5, 0.0, 2.25], dtype=torch.float32),
        "half": torch.tensor([0.5, -2.0], dtype=torch.bfloat16),
        "f16": torch.tensor([[1.0], [3.0]], dtype=torch.float16),
        "f64": torch.tensor(3.141592653589793, dtype=torch.float64),
        "count": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }


def test_state_digest_of_a_fixed_state_is_pinned() -> None:
    assert (
        state_digest(fixed_state())
        == "0b3aa82e6444dc4901541e68fc57d5e4409f6f5596b6edb0fc75efb65530d049"
    )


def test_the_default_spec_builds_the_pinned_initial_base() -> None:
    base = ConsortiumCoordinator(ModelSpec().build(0))
    assert base.base_sha256 == "8b71377d25d0d07cfce306c6e6fab203e28ab84a23ce8b2421ef10ea94e8f5d6"


JOURNALED = {
    "fedavg": [
        ("86e77e14bbf9fd89719d446587f0936854dab8b62f7644133980ea38785b93c9", ""),
        ("4e002d501df70e8b58161a40440e1e9c61447b833b949115aa6fe22c3777e2e2", ""),
    ],
    "diloco": [
        (
            "f0e0d9f5020329ee0d7c9911a6a51de4ea0015b79e43665153062fa5b4151730",
            "5583c35fe9f30dd82ce73873d775862b1c384ca4737fcc28fdfd734da82b5f11",
        ),
        (
            "05064457f07d6a51eacca076d85e168af3697a44788cb09b4ab86a3ce2882ec9",
            "d696a7d20c0d7d8072b41543ab93581992d3b46944da924dbbae0ca3d4c26e91",
        ),
    ],
}


@pytest.mark.parametrize("strategy", sorted(JOURNALED))
def test_two_journaled_rounds_keep_their_digests(tmp_path: Path, strategy: str) -> None:
    """Two real rounds (training included), committed to a journal: the base digests and the
    strategy state's digest (diloco's momentum, ``outer_momentum_sha256`` on disk) that the
    records keep, and that a restart checks the files against."""
    torch.manual_seed(0)
    model = TinyCausalModel(vocab_size=256, hidden_size=8)
    corpora = {
        "vietnam": [list(b"xin chao the gioi"), list(b"ha noi mua thu")],
        "india": [list(b"namaste duniya"), list(b"dilli ki sardi")],
    }
    nodes = [
        SovereignTrainingNode(n, n.title(), model, c, q, local_epochs=2, seed=5)
        for (n, c), q in zip(corpora.items(), (0.9, 0.8), strict=True)
    ]
    core = ConsortiumCoordinator(model, ContributionPolicy(0.5, 0.7, strategy=strategy))
    store = CoordinatorStore(tmp_path)
    store.save_initial_base(core.shared_base_state)
    for _ in range(2):
        core.run_round(nodes, commit=lambda result: store.commit_round(result, "req"))
    recorded = [
        (r.result.shared_base_sha256, r.result.outer_momentum_sha256) for r in store.records()
    ]
    assert recorded == JOURNALED[strategy]
    assert store.latest() is not None and store.latest()[0] == 2  # the files match them


# [model] tables and the identity a coordinator's data directory records for each
# (consortium.json), as ModelConfig.model_dump(mode="json", exclude_none=True) gave them at
# 150276e: a data directory written then must still be recognised.
IDENTITIES = [
    ({}, {"architecture": "tiny-causal", "vocab_size": 256, "hidden_size": 32}),
    ({"hidden_size": 48}, {"architecture": "tiny-causal", "vocab_size": 256, "hidden_size": 48}),
    (
        {"architecture": "tiny-causal", "vocab_size": 300, "hidden_size": 32},
        {"architecture": "tiny-causal", "vocab_size": 300, "hidden_size": 32},
    ),
    (
        {"architecture": "gpt"},
        {
            "architecture": "gpt",
            "vocab_size": 256,
            "hidden_size": 32,
            "n_layers": 2,
            "n_heads": 2,
            "context_length": 128,
            "tie_embeddings": True,
        },
    ),
    (
        {
            "architecture": "gpt",
            "hidden_size": 64,
            "n_layers": 3,
            "n_heads": 4,
            "context_length": 32,
            "tie_embeddings": False,
        },
        {
            "architecture": "gpt",
            "vocab_size": 256,
            "hidden_size": 64,
            "n_layers": 3,
            "n_heads": 4,
            "context_length": 32,
            "tie_embeddings": False,
        },
    ),
    (
        {
            "architecture": "hf-causal-lm",
            "hf_config": {
                "model_type": "gpt2",
                "vocab_size": 256,
                "n_embd": 16,
                "n_layer": 1,
                "n_head": 2,
                "n_positions": 64,
                "bos_token_id": None,
            },
        },
        {
            "architecture": "hf-causal-lm",
            "vocab_size": 256,
            "hidden_size": 32,
            "hf_config": {
                "model_type": "gpt2",
                "vocab_size": 256,
                "n_embd": 16,
                "n_layer": 1,
                "n_head": 2,
                "n_positions": 64,
            },
        },
    ),
]


@pytest.mark.parametrize(("table", "identity"), IDENTITIES)
def test_a_model_table_keeps_the_identity_data_directories_recorded(
    table: dict[str, object], identity: dict[str, object]
) -> None:
    assert model_table(model_from_table(table)) == identity
