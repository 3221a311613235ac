"""The one interface every integration strategy implements, and what it returns.

A strategy is built once from its settings (:func:`~.registry.make_strategy`) and kept by the
coordinator across rounds. It may carry state that outlives a round (diloco's outer momentum):
:meth:`Strategy.apply` reads that state but never changes it, and returns the state that would
follow the step; the coordinator :meth:`~Strategy.adopt`\\ s it only once the round is
committed. The round and the journal hold the state as an opaque model state: they never ask
which strategy runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.strategies.settings import IntegrationStrategy

WeightedDeltas = Sequence[tuple[float, Mapping[str, torch.Tensor]]]
"""The accepted ``(weight, delta)`` pairs, in the order the nodes were given."""


@dataclass(frozen=True)
class Integrated:
    """A strategy's output: the new base and the strategy's state after the step (``None``
    for a strategy without state)."""

    state: ModelState
    strategy_state: ModelState | None = None


class Strategy(ABC):
    """Combines the accepted deltas into the next base; see the module."""

    def __init__(self, settings: IntegrationStrategy) -> None:
        self.settings = settings
        self._state: ModelState | None = None

    @property
    def state(self) -> ModelState | None:
        """The state in force (``None``: none, or its initial value); read, never edit."""
        return self._state

    def apply(
        self,
        base: Mapping[str, torch.Tensor],
        weighted_deltas: WeightedDeltas,
        *,
        delta_norms: Sequence[float] | None = None,
    ) -> Integrated:
        """The new base from the accepted ``(weight, delta)`` pairs (inputs are never
        modified). ``delta_norms`` (aligned with the deltas) is required with
        ``clip_delta_norm``."""
        scales = self.settings.clip_scales(weighted_deltas, delta_norms)
        return self._combine(base, weighted_deltas, scales)

    @abstractmethod
    def _combine(
        self,
        base: Mapping[str, torch.Tensor],
        weighted_deltas: WeightedDeltas,
        scales: Sequence[float],
    ) -> Integrated: ...

    def adopt(self, state: ModelState | None) -> None:
        """Make ``state`` (a committed :attr:`Integrated.strategy_state`, or one restored
        from the journal) the state in force."""
        self._state = state

    def state_problem(
        self, state: Mapping[str, torch.Tensor] | None, base: Mapping[str, torch.Tensor]
    ) -> str | None:
        """Why ``state`` cannot be this strategy's state for ``base``; ``None`` when it can.
        A strategy without state takes any (and keeps none: :meth:`restorable`)."""
        return None

    def restorable(self, state: ModelState | None) -> ModelState | None:
        """What this strategy keeps of a state committed with an earlier base (a rollback
        under another strategy may hand it one it does not use): by default nothing."""
        return None


def scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor`` times ``scale`` (itself when the scale is 1)."""
    return tensor if scale == 1.0 else tensor * scale
