"""Every jurisdiction's held-out split, rebuilt exactly as each node builds it, and one
function that scores a state on all of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tapestry.config import NodeConfig
from tapestry.corpus import SplitCorpus, load_node_corpus
from tapestry.training.consortium.local.evaluation import heldout_loss
from tapestry.training.consortium.local.node import pad_corpus
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.models.state import load_model_state

EVAL_BATCH = 32  # rows per forward pass; the mean does not depend on it (heldout_loss)


@dataclass(frozen=True)
class Member:
    """A node as the evidence sees it: its configuration and its split corpus."""

    config: NodeConfig
    corpus: SplitCorpus

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def jurisdiction(self) -> str:
        return self.config.jurisdiction


def member(config: NodeConfig) -> Member:
    """The node's corpus split by the node's own function (:func:`load_node_corpus`)."""
    return Member(config, load_node_corpus(config))


class HeldOutScorer:
    """Scores any model state on every member's held-out split, with the loss the nodes
    report (mean nats per real target token)."""

    def __init__(self, spec: ModelSpec, members: list[Member], seed: int) -> None:
        self.model = spec.build(seed)
        self.splits = {
            m.jurisdiction: pad_corpus(m.corpus.heldout) for m in members if m.corpus.heldout
        }

    def losses(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``{jurisdiction: held-out loss}`` of ``state``."""
        load_model_state(self.model, state)
        return {
            place: heldout_loss(self.model, inputs, targets, EVAL_BATCH)[0]
            for place, (inputs, targets) in self.splits.items()
        }
