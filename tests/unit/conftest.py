"""Shared fixtures for the in-process core: a seeded base and three tiny sovereign nodes.

Corpora are a handful of short byte-encoded lines, and nodes train 2 epochs in batches of
2, so a whole round takes milliseconds on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from tapestry.training.consortium import ModelSpec, SovereignTrainingNode

CONSORTIUM_SEED = 7
STATE_KEYS = ["embedding.weight", "lm_head.weight", "lm_head.bias"]


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


CORPORA: dict[str, list[list[int]]] = {
    "vn": [
        encode(line)
        for line in (
            "Lúa nổi trên đồng bằng sông Cửu Long.",
            "Mùa nước nổi mang phù sa.",
            "Trạm y tế xã mở cửa sớm.",
            "Rice, shrimp and salt.",
            "Cần Thơ",
        )
    ],
    "ch": [
        encode(line)
        for line in (
            "Die Gemeinde stimmt am Sonntag ab.",
            "La commune vote dimanche.",
            "Il comune vota domenica.",
            "Föhn über dem Urnersee.",
            "Uhrwerk, 0.01 mm",
            "Chur",
        )
    ],
    "in": [
        encode(line)
        for line in (
            "मानसून जून में आता है।",
            "The monsoon reaches Kerala first.",
            "மழை வந்தது.",
            "UPI payments settle in seconds.",
        )
    ],
}
JURISDICTIONS = {"vn": "Vietnam", "ch": "Switzerland", "in": "India"}
QUALITY = {"vn": 0.90, "ch": 0.86, "in": 0.88}
NODE_DEFAULTS: dict[str, Any] = {"local_epochs": 2, "batch_size": 2, "lr": 1e-2}

MakeNode = Callable[..., SovereignTrainingNode]
MakeNodes = Callable[..., list[SovereignTrainingNode]]
StatesEqual = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], None]


@pytest.fixture
def base_model() -> nn.Module:
    """A freshly built consortium base (the same bits every time)."""
    return ModelSpec().build(CONSORTIUM_SEED)


@pytest.fixture
def make_node(base_model: nn.Module) -> MakeNode:
    """``make_node("vn", quality_score=0.5, corpus=[[1, 2]], local_epochs=1, ...)``: a node
    built from the fixture base with the shared defaults, each keyword overridable."""

    def make(
        node_id: str,
        *,
        model: nn.Module | None = None,
        corpus: Sequence[Sequence[int]] | None = None,
        quality_score: float | None = None,
        jurisdiction: str | None = None,
        **overrides: Any,
    ) -> SovereignTrainingNode:
        options = NODE_DEFAULTS | {"seed": CONSORTIUM_SEED} | overrides
        return SovereignTrainingNode(
            node_id,
            jurisdiction if jurisdiction is not None else JURISDICTIONS.get(node_id, node_id),
            model if model is not None else base_model,
            corpus if corpus is not None else CORPORA[node_id],
            quality_score if quality_score is not None else QUALITY[node_id],
            **options,
        )

    return make


@pytest.fixture
def make_nodes(make_node: MakeNode) -> MakeNodes:
    """Fresh, identically built nodes for the three jurisdictions (or the ids given)."""

    def make(
        ids: Sequence[str] = ("vn", "ch", "in"), **overrides: Any
    ) -> list[SovereignTrainingNode]:
        return [make_node(node_id, **overrides) for node_id in ids]

    return make


def assert_states_equal(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    """Same keys, and every tensor bitwise equal (dtype and shape included)."""
    assert list(left) == list(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


@pytest.fixture
def states_equal() -> Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], None]:
    return assert_states_equal


def trailer_of(state: dict[str, torch.Tensor]) -> Any:
    """The trailer :func:`~tapestry.wire.tensor_stream.send_state` closes ``state`` with."""
    from tapestry.wire.tensor_stream import send_state

    return list(send_state(state, lambda chunk: chunk, lambda trailer: trailer))[-1]
