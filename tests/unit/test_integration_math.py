"""integrate() and check_contribution(): the tensor maths shared in-process and by services."""

from __future__ import annotations

import math

import pytest
import torch

from tapestry.training.consortium import (
    InvalidContribution,
    ModelState,
    SovereignContribution,
    check_contribution,
    integrate,
)

from .conftest import StatesEqual


def small_base() -> ModelState:
    return {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}


def contribution(
    delta: ModelState, *, node_id: str = "vn", round_num: int = 1
) -> SovereignContribution:
    return SovereignContribution(
        node_id=node_id,
        round_num=round_num,
        weight_delta=delta,
        quality_score=0.9,
        token_count=10,
        metrics={"loss": 1.0},
    )


# --- integrate ----------------------------------------------------------------------------


def test_integrate_adds_the_weighted_deltas_by_hand() -> None:
    d1 = {"w": torch.tensor([1.0, 0.0, -1.0]), "b": torch.tensor([2.0])}
    d2 = {"w": torch.tensor([0.0, 4.0, 2.0]), "b": torch.tensor([-1.0])}

    merged = integrate(small_base(), [(0.25, d1), (0.75, d2)])

    # w: [1 + .25, 2 + 3, 3 - .25 + 1.5]; b: .5 + .5 - .75 (all exact in binary)
    assert list(merged) == ["w", "b"]
    assert torch.equal(merged["w"], torch.tensor([1.25, 5.0, 4.25]))
    assert torch.equal(merged["b"], torch.tensor([0.25]))


def test_integrate_adds_in_the_order_given(states_equal: StatesEqual) -> None:
    gen = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(64, generator=gen)}
    deltas = [(w, {"w": torch.randn(64, generator=gen)}) for w in (0.3, 0.45, 0.25)]

    expected = base["w"].clone()
    for weight, delta in deltas:
        expected.add_(delta["w"], alpha=weight)

    states_equal(integrate(base, deltas), {"w": expected})


def test_integrate_with_no_deltas_is_a_bitwise_copy(states_equal: StatesEqual) -> None:
    base = small_base()

    merged = integrate(base, [])

    states_equal(merged, base)
    assert all(merged[k].data_ptr() != base[k].data_ptr() for k in base)


def test_integrate_never_modifies_its_inputs(states_equal: StatesEqual) -> None:
    base, delta = small_base(), {"w": torch.ones(3), "b": torch.ones(1)}
    base_before = {k: v.clone() for k, v in base.items()}
    delta_before = {k: v.clone() for k, v in delta.items()}

    integrate(base, [(0.5, delta)])

    states_equal(base, base_before)
    states_equal(delta, delta_before)


def test_integrate_keeps_non_floating_entries_from_the_base() -> None:
    base = {
        "w": torch.tensor([1.0]),
        "steps": torch.tensor([3], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    delta = {
        "w": torch.tensor([2.0]),
        "steps": torch.tensor([5], dtype=torch.int64),
        "mask": torch.tensor([True, True]),
    }

    merged = integrate(base, [(0.5, delta)])

    assert torch.equal(merged["w"], torch.tensor([2.0]))
    assert torch.equal(merged["steps"], torch.tensor([3]))
    assert torch.equal(merged["mask"], torch.tensor([True, False]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.complex64])
def test_integrate_keeps_each_dtype(dtype: torch.dtype) -> None:
    base = {"x": torch.tensor([1.0, 2.0]).to(dtype)}
    delta = {"x": torch.tensor([4.0, -2.0]).to(dtype)}

    merged = integrate(base, [(0.5, delta)])

    assert merged["x"].dtype == dtype
    assert torch.equal(merged["x"], torch.tensor([3.0, 1.0]).to(dtype))


# --- check_contribution ---------------------------------------------------------------------


def test_a_matching_contribution_passes() -> None:
    delta = {"w": torch.zeros(3), "b": torch.zeros(1)}

    check_contribution(contribution(delta), small_base(), node_id="vn", round_num=1)


def test_invalid_contribution_is_a_value_error() -> None:
    assert issubclass(InvalidContribution, ValueError)


@pytest.mark.parametrize(
    ("delta", "kwargs", "message"),
    [
        (
            {"w": torch.zeros(3), "b": torch.zeros(1)},
            {"node_id": "mallory"},
            "contribution claims node_id 'mallory' but came from 'vn'",
        ),
        (
            {"w": torch.zeros(3), "b": torch.zeros(1)},
            {"round_num": 2},
            "contribution is for round 2, expected round 1",
        ),
        (
            {"w": torch.zeros(3)},
            {},
            "delta keys differ from the base: missing ['b'], unexpected []",
        ),
        (
            {"w": torch.zeros(3), "b": torch.zeros(1), "c": torch.zeros(1)},
            {},
            "delta keys differ from the base: missing [], unexpected ['c']",
        ),
        (
            {"w": torch.zeros(4), "b": torch.zeros(1)},
            {},
            "delta 'w': expected torch.float32 (3,), got torch.float32 (4,)",
        ),
        (
            {"w": torch.zeros(3, 1), "b": torch.zeros(1)},
            {},
            "delta 'w': expected torch.float32 (3,), got torch.float32 (3, 1)",
        ),
        (
            {"w": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(1)},
            {},
            "delta 'w': expected torch.float32 (3,), got torch.float64 (3,)",
        ),
        (
            {"w": torch.tensor([0.0, math.nan, 0.0]), "b": torch.zeros(1)},
            {},
            "delta 'w' holds NaN or Inf values",
        ),
        (
            {"w": torch.zeros(3), "b": torch.tensor([-math.inf])},
            {},
            "delta 'b' holds NaN or Inf values",
        ),
    ],
    ids=["node-id", "round", "missing-key", "extra-key", "shape", "rank", "dtype", "nan", "inf"],
)
def test_check_contribution_refuses(
    delta: ModelState, kwargs: dict[str, object], message: str
) -> None:
    claimed = {"node_id": "vn", "round_num": 1} | kwargs

    with pytest.raises(InvalidContribution) as caught:
        check_contribution(
            contribution(delta, **claimed),  # type: ignore[arg-type]
            small_base(),
            node_id="vn",
            round_num=1,
        )
    assert str(caught.value) == message
