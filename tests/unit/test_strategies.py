"""Integration strategies against results computed by hand on small tensors.

Every value here is exact in binary (small integers, halves, quarters), so the expected
results are compared bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tapestry.training.consortium import ContributionPolicy, ModelState, integrate
from tapestry.training.consortium.strategies.base import Strategy
from tapestry.training.consortium.strategies.registry import make_strategy
from tapestry.training.consortium.strategies.settings import (
    IntegrationStrategy,
    OuterOptimizer,
    StrategyName,
)
from tapestry.training.consortium.tensors import all_finite, state_norm

from .conftest import StatesEqual
from .test_spill import _spill, _state


def base() -> ModelState:
    return {"w": torch.tensor([1.0, 2.0, 3.0]), "steps": torch.tensor([7])}


def delta(*values: float, steps: int = 5) -> ModelState:
    return {"w": torch.tensor(values, dtype=torch.float32), "steps": torch.tensor([steps])}


def strategy(name: str, **settings: object) -> Strategy:
    return make_strategy(IntegrationStrategy(StrategyName(name), **settings))  # type: ignore[arg-type]


def w_after(merged: ModelState) -> list[float]:
    return merged["w"].tolist()


ODD = [delta(1, 5, -2), delta(3, 0, 7), delta(2, 9, 1)]
EVEN = [*ODD, delta(10, -1, 0)]


# --- fedavg ---------------------------------------------------------------------------------


def test_the_default_strategy_is_fedavg_with_the_proof_of_concepts_signature() -> None:
    policy = ContributionPolicy(0.75, 0.5, "quality")

    assert policy.strategy == IntegrationStrategy()
    assert policy.strategy.name is StrategyName.FEDAVG
    assert policy.strategy.describe() == "fedavg"
    assert repr(policy) == (
        "ContributionPolicy(quality_floor=0.75, max_node_weight=0.5, weighting='quality')"
    )


def test_fedavg_is_integrate_bit_for_bit(states_equal: StatesEqual) -> None:
    gen = torch.Generator().manual_seed(11)
    start = {"w": torch.randn(257, generator=gen), "steps": torch.tensor([3])}
    weighted = [
        (w, {"w": torch.randn(257, generator=gen), "steps": torch.tensor([1])})
        for w in (0.3, 0.45, 0.25)
    ]

    integrated = make_strategy(IntegrationStrategy()).apply(start, weighted)

    states_equal(integrated.state, integrate(start, weighted))
    assert integrated.strategy_state is None


def test_fedavg_clips_each_delta_to_the_bound_before_weighting() -> None:
    # |(3, 4, 0)| = 5 is scaled by 2.5/5 to (1.5, 2, 0); |(0, 1, 0)| = 1 is under the bound.
    weighted = [(0.5, delta(3, 4, 0)), (0.5, delta(0, 1, 0))]

    merged = strategy("fedavg", clip_delta_norm=2.5).apply(base(), weighted, delta_norms=[5.0, 1.0])

    assert w_after(merged.state) == [1 + 0.75, 2 + 1.0 + 0.5, 3.0]
    assert merged.state["steps"].tolist() == [7]  # integer entries are kept from the base


def test_clipping_needs_the_norms() -> None:
    with pytest.raises(ValueError, match="needs every accepted delta's norm"):
        strategy("median", clip_delta_norm=1.0).apply(base(), [(1.0, delta(1, 1, 1))])


# --- median and trimmed mean ---------------------------------------------------------------


def test_median_of_an_odd_count_is_the_middle_value_per_coordinate() -> None:
    # coordinate-wise: (1, 3, 2) -> 2, (5, 0, 9) -> 5, (-2, 7, 1) -> 1
    merged = strategy("median").apply(base(), [(1 / 3, d) for d in ODD])

    assert w_after(merged.state) == [1 + 2, 2 + 5, 3 + 1]
    assert merged.state["steps"].tolist() == [7]
    assert merged.strategy_state is None


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    # sorted: (1, 2, 3, 10) -> 2.5; (-1, 0, 5, 9) -> 2.5; (-2, 0, 1, 7) -> 0.5
    merged = strategy("median").apply(base(), [(0.25, d) for d in EVEN])

    assert w_after(merged.state) == [3.5, 4.5, 3.5]


def test_median_and_trimmed_mean_ignore_the_weights(states_equal: StatesEqual) -> None:
    for name in ("median", "trimmed_mean"):
        evenly = strategy(name).apply(base(), [(0.25, d) for d in EVEN])
        skewed = strategy(name).apply(base(), list(zip((0.7, 0.1, 0.1, 0.1), EVEN, strict=True)))
        states_equal(evenly.state, skewed.state)


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        # five values per coordinate: (1, 2, 3, 4, 100) and (-8, 0, 0, 4, 4)
        (0.0, [22.0, 0.0]),  # nothing trimmed: the plain mean
        (0.2, [3.0, 4 / 3]),  # k = 1: mean of (2, 3, 4) and (0, 0, 4)
        (0.4, [3.0, 0.0]),  # k = 2: the median
        (0.49, [3.0, 0.0]),  # k = floor(2.45) = 2
    ],
)
def test_trimmed_mean_drops_floor_fraction_times_n_values_at_each_end(
    fraction: float, expected: list[float]
) -> None:
    start = {"w": torch.zeros(2)}
    deltas = [
        {"w": torch.tensor(v)} for v in ([100.0, 4.0], [1.0, 0.0], [3.0, -8.0], [2.0, 4.0])
    ] + [{"w": torch.tensor([4.0, 0.0])}]

    merged = strategy("trimmed_mean", trim_fraction=fraction).apply(
        start, [(0.2, d) for d in deltas]
    )

    assert merged.state["w"].tolist() == pytest.approx(expected, abs=0, rel=1e-7)


def test_trimmed_mean_defaults_to_a_fifth_and_trims_nothing_from_four() -> None:
    chosen = strategy("trimmed_mean")
    assert chosen.settings.trim_fraction == 0.2
    # floor(0.2 · 4) = 0: the mean of (1, 3, 2, 10), (5, 0, 9, -1), (-2, 7, 1, 0)
    merged = chosen.apply(base(), [(0.25, d) for d in EVEN])
    assert w_after(merged.state) == [1 + 4, 2 + 3.25, 3 + 1.5]


def test_robust_strategies_clip_before_they_sort() -> None:
    # (30, 40, 0) has norm 50 and is scaled to (3, 4, 0) by a bound of 5.
    weighted = [(0.5, delta(30, 40, 0)), (0.5, delta(1, 0, 2))]
    merged = strategy("median", clip_delta_norm=5.0).apply(
        base(), weighted, delta_norms=[50.0, 5**0.5]
    )
    assert w_after(merged.state) == [1 + 2, 2 + 2, 3 + 1]


def test_complex_entries_take_real_and_imaginary_parts_apart() -> None:
    start = {"z": torch.zeros(1, dtype=torch.complex64)}
    values = (complex(1, 9), complex(5, 2), complex(3, 4))
    deltas = [(1 / 3, {"z": torch.tensor([v], dtype=torch.complex64)}) for v in values]

    merged = strategy("median").apply(start, deltas)

    assert merged.state["z"].tolist() == [complex(3, 4)]


# --- diloco ---------------------------------------------------------------------------------


def test_diloco_with_lr_1_and_no_momentum_is_fedavg() -> None:
    weighted = [(0.25, delta(1, 5, -2)), (0.75, delta(3, 0, 7))]
    plain = strategy("diloco", outer=OuterOptimizer(lr=1.0, momentum=0.0))

    by_hand = strategy("fedavg").apply(base(), weighted).state
    assert w_after(plain.apply(base(), weighted).state) == w_after(by_hand)

    gen = torch.Generator().manual_seed(5)
    start = {"w": torch.randn(1000, generator=gen)}
    noisy = [(w, {"w": torch.randn(1000, generator=gen)}) for w in (0.2, 0.5, 0.3)]
    # Equal up to rounding: the pseudo-gradient is summed before it meets the base.
    torch.testing.assert_close(
        plain.apply(start, noisy).state["w"], integrate(start, noisy)["w"], rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("nesterov", "after_one", "after_two"),
    [
        # round 1: g = -(0.5·2 + 0.5·4) = -3; m = -3
        #   Nesterov: u = g + 0.5·m = -4.5; w = 1 - 0.5·(-4.5) = 3.25
        #   plain:    u = m = -3;           w = 1 + 1.5 = 2.5
        # round 2: g = -1; m = 0.5·(-3) - 1 = -2.5
        #   Nesterov: u = -1 + 0.5·(-2.5) = -2.25; w = 3.25 + 1.125 = 4.375
        #   plain:    u = -2.5;                    w = 2.5 + 1.25 = 3.75
        (True, 3.25, 4.375),
        (False, 2.5, 3.75),
    ],
)
def test_two_diloco_rounds_by_hand(nesterov: bool, after_one: float, after_two: float) -> None:
    outer = strategy("diloco", outer=OuterOptimizer(lr=0.5, momentum=0.5, nesterov=nesterov))
    start = {"w": torch.tensor([1.0]), "steps": torch.tensor([7])}

    two, four = ({"w": torch.tensor([v]), "steps": torch.tensor([1])} for v in (2.0, 4.0))
    first = outer.apply(start, [(0.5, two), (0.5, four)])
    assert first.state["w"].tolist() == [after_one]
    assert first.strategy_state is not None and first.strategy_state["w"].tolist() == [-3.0]
    assert list(first.strategy_state) == ["w"]  # no momentum for integer entries
    assert first.state["steps"].tolist() == [7]

    one = {"w": torch.tensor([1.0]), "steps": torch.tensor([0])}
    outer.adopt(first.strategy_state)  # the round committed: its momentum is in force
    second = outer.apply(first.state, [(0.5, one), (0.5, one)])
    assert second.state["w"].tolist() == [after_two]
    assert second.strategy_state is not None and second.strategy_state["w"].tolist() == [-2.5]


def test_diloco_keeps_half_precision_momentum_in_float32() -> None:
    start = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    step = strategy("diloco").apply(
        start, [(1.0, {"w": torch.tensor([0.5], dtype=torch.bfloat16)})]
    )
    assert step.state["w"].dtype == torch.bfloat16
    assert step.strategy_state is not None and step.strategy_state["w"].dtype == torch.float32


def test_diloco_clips_before_the_outer_step() -> None:
    # (6, 8, 0) has norm 10, clipped to 5: (3, 4, 0); lr 1, μ 0 makes the step that delta.
    plain = strategy("diloco", clip_delta_norm=5.0, outer=OuterOptimizer(1.0, 0.0))
    merged = plain.apply(base(), [(1.0, delta(6, 8, 0))], delta_norms=[10.0])
    assert w_after(merged.state) == [4.0, 6.0, 3.0]


def test_inputs_are_never_modified(states_equal: StatesEqual) -> None:
    for name in StrategyName:
        start, deltas = base(), [delta(1, 2, 3), delta(3, 2, 1)]
        momentum = {"w": torch.tensor([1.0, 1.0, 1.0])}
        before = [{k: v.clone() for k, v in s.items()} for s in (start, *deltas, momentum)]
        chosen = strategy(name)
        chosen.adopt(momentum if name is StrategyName.DILOCO else None)
        chosen.apply(start, [(0.5, d) for d in deltas])
        for kept, now in zip(before, (start, *deltas, momentum), strict=True):
            states_equal(now, kept)


# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "mean"}, r"strategy must be one of \['fedavg', 'diloco', 'median'"),
        (
            {"name": "median", "trim_fraction": 0.1},
            "trim_fraction applies to strategy 'trimmed_mean' only",
        ),
        ({"name": "trimmed_mean", "trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\)"),
        ({"name": "trimmed_mean", "trim_fraction": -0.1}, r"must be in \[0, 0.5\)"),
        (
            {"name": "fedavg", "outer": OuterOptimizer()},
            "the outer optimizer's settings apply to strategy 'diloco' only",
        ),
        ({"name": "fedavg", "clip_delta_norm": 0.0}, "clip_delta_norm must be None or"),
        ({"name": "fedavg", "clip_delta_norm": float("inf")}, "clip_delta_norm must be None"),
    ],
)
def test_invalid_settings_are_refused_with_what_to_fix(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        IntegrationStrategy(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr": 0.0}, r"outer lr must be in \(0, 10.0\]"),
        ({"lr": 11.0}, r"outer lr must be in"),
        ({"momentum": 1.0}, r"outer momentum must be in \[0, 1\)"),
        ({"momentum": float("nan")}, r"outer momentum must be in"),
    ],
)
def test_invalid_outer_optimizer_is_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OuterOptimizer(**settings)  # type: ignore[arg-type]


def test_policies_name_their_strategy() -> None:
    diloco = ContributionPolicy(strategy="diloco")
    assert diloco.strategy.outer == OuterOptimizer(0.7, 0.9, True)
    assert diloco.strategy.describe() == "diloco lr 0.7 μ 0.9 nesterov"
    assert "strategy='diloco lr 0.7 μ 0.9 nesterov'" in repr(diloco)
    clipped = IntegrationStrategy(StrategyName.TRIMMED_MEAN, clip_delta_norm=3.0)
    assert ContributionPolicy(strategy=clipped).needs_delta_norms
    assert clipped.describe() == "trimmed_mean trim 0.2, clip 3"
    assert not ContributionPolicy().needs_delta_norms
    with pytest.raises(ValueError, match="strategy must be one of"):
        ContributionPolicy(strategy="krum")


@pytest.mark.parametrize("name", list(StrategyName))
def test_spilled_deltas_give_the_bits_of_deltas_in_memory(
    tmp_path: Path, name: StrategyName, states_equal: StatesEqual
) -> None:
    """Read one tensor at a time from disk, as the service integrates; the spill test's
    state covers the awkward cases: bfloat16, an empty tensor, a 0-d integer."""
    start = _state()
    gen = torch.Generator().manual_seed(9)
    deltas = [
        {k: (torch.randn(t.shape, generator=gen) * 0.1).to(t.dtype) for k, t in start.items()}
        for _ in range(4)
    ]
    spilled = [_spill(tmp_path / str(i), d) for i, d in enumerate(deltas)]
    chosen = make_strategy(IntegrationStrategy(name, clip_delta_norm=0.5))
    norms = [state_norm(d) for d in deltas]

    in_memory = chosen.apply(start, [(0.25, d) for d in deltas], delta_norms=norms)
    from_disk = chosen.apply(start, [(0.25, d) for d in spilled], delta_norms=norms)

    states_equal(from_disk.state, in_memory.state)
    assert from_disk.state["c.empty"].shape == (0, 3)
    assert from_disk.state["d.count"].item() == 7
    assert all_finite(from_disk.state)
