"""A strategy object from its settings."""

from __future__ import annotations

from tapestry.training.consortium.strategies.base import Strategy
from tapestry.training.consortium.strategies.diloco import DiLoCo
from tapestry.training.consortium.strategies.fedavg import FedAvg
from tapestry.training.consortium.strategies.robust import CoordinateWise
from tapestry.training.consortium.strategies.settings import IntegrationStrategy, StrategyName

_KINDS: dict[StrategyName, type[Strategy]] = {
    StrategyName.FEDAVG: FedAvg,
    StrategyName.DILOCO: DiLoCo,
    StrategyName.MEDIAN: CoordinateWise,
    StrategyName.TRIMMED_MEAN: CoordinateWise,
}


def make_strategy(settings: IntegrationStrategy) -> Strategy:
    """A fresh strategy for ``settings``, with its initial state."""
    return _KINDS[settings.name](settings)
