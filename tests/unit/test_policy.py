"""ContributionPolicy: which contributions count and with what weight (pure maths)."""

from __future__ import annotations

import dataclasses
import math
import random
import re

import pytest

from tapestry.training.consortium import (
    ContributionPolicy,
    ContributionWeighting,
    PolicyDecision,
)

# --- construction -----------------------------------------------------------------------


def test_defaults_are_the_proof_of_concepts() -> None:
    policy = ContributionPolicy()

    assert policy.quality_floor == 0.0
    assert policy.max_node_weight == 1.0
    assert policy.weighting is ContributionWeighting.QUALITY


@pytest.mark.parametrize("floor", [-0.1, -1e-12, math.nan, math.inf])
def test_floor_must_be_finite_and_not_negative(floor: float) -> None:
    with pytest.raises(ValueError, match="quality_floor must be a finite number >= 0"):
        ContributionPolicy(quality_floor=floor)


@pytest.mark.parametrize("cap", [0.0, -0.5, 1.0000001, 2.0, math.nan, math.inf])
def test_cap_must_be_in_zero_one(cap: float) -> None:
    with pytest.raises(ValueError, match=r"max_node_weight must be in \(0, 1\]"):
        ContributionPolicy(max_node_weight=cap)


@pytest.mark.parametrize("cap", [1e-9, 0.5, 1.0])
def test_cap_bounds_that_are_accepted(cap: float) -> None:
    assert ContributionPolicy(max_node_weight=cap).max_node_weight == cap


@pytest.mark.parametrize("weighting", ["median", "QUALITY", "", None])
def test_unknown_weighting_is_refused(weighting: object) -> None:
    got = re.escape(repr(weighting))
    expected = rf"^weighting must be one of \['quality', 'equal'\], got {got}$"
    with pytest.raises(ValueError, match=expected):
        ContributionPolicy(weighting=weighting)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        ("quality", ContributionWeighting.QUALITY),
        ("equal", ContributionWeighting.EQUAL),
        (ContributionWeighting.QUALITY, ContributionWeighting.QUALITY),
        (ContributionWeighting.EQUAL, ContributionWeighting.EQUAL),
    ],
)
def test_weighting_accepts_strings_and_the_enum(
    weighting: str | ContributionWeighting, expected: ContributionWeighting
) -> None:
    assert ContributionPolicy(weighting=weighting).weighting is expected


def test_weighting_enum_is_a_str_enum() -> None:
    assert isinstance(ContributionWeighting.QUALITY, str)
    assert ContributionWeighting.QUALITY == "quality"
    assert ContributionWeighting.EQUAL == "equal"
    assert [w.value for w in ContributionWeighting] == ["quality", "equal"]


# --- which scores count -----------------------------------------------------------------


def test_no_scores_give_no_weights() -> None:
    assert ContributionPolicy().weights({}) == {}
    assert ContributionPolicy().decide({}) == PolicyDecision({}, {})


def test_no_counted_score_gives_no_weights() -> None:
    assert ContributionPolicy(quality_floor=0.5).weights({"a": 0.1, "b": 0.49}) == {}


def test_floor_is_inclusive() -> None:
    weights = ContributionPolicy(quality_floor=0.75).weights({"a": 0.75, "b": 0.7499})

    assert weights == {"a": 1.0}


@pytest.mark.parametrize(
    ("score", "reason"),
    [
        (0.5, "quality score 0.5 is below the floor 0.75"),
        (0.0, "quality score 0.0 is not > 0"),
        (-1, "quality score -1.0 is not > 0"),
        (math.nan, "quality score nan is not a finite number"),
        (math.inf, "quality score inf is not a finite number"),
        (-math.inf, "quality score -inf is not a finite number"),
    ],
)
def test_rejection_reasons(score: float, reason: str) -> None:
    decision = ContributionPolicy(quality_floor=0.75).decide({"ok": 0.9, "bad": score})

    assert decision.weights == {"ok": 1.0}
    assert decision.rejection_reasons == {"bad": reason}


def test_zero_is_refused_even_with_a_zero_floor() -> None:
    decision = ContributionPolicy(quality_floor=0.0).decide({"a": 0.0, "b": 2.0})

    assert decision.weights == {"b": 1.0}
    assert decision.rejection_reasons == {"a": "quality score 0.0 is not > 0"}


def test_every_node_is_either_weighted_or_given_a_reason() -> None:
    scores = {"a": 0.9, "b": 0.1, "c": math.nan, "d": 0.8, "e": 0.0}
    decision = ContributionPolicy(quality_floor=0.5).decide(scores)

    assert set(decision.weights) == {"a", "d"}
    assert set(decision.rejection_reasons) == {"b", "c", "e"}


# --- equal weighting --------------------------------------------------------------------


def test_equal_weighting_gives_one_over_k() -> None:
    policy = ContributionPolicy(quality_floor=0.3, weighting="equal")

    decision = policy.decide({"a": 0.9, "b": 0.2, "c": 0.5, "d": 100.0})

    assert decision.weights == {"a": 1 / 3, "c": 1 / 3, "d": 1 / 3}
    assert decision.rejection_reasons == {"b": "quality score 0.2 is below the floor 0.3"}


def test_equal_weighting_under_a_feasible_cap() -> None:
    weights = ContributionPolicy(max_node_weight=0.25, weighting="equal").weights(
        {"a": 1.0, "b": 9.0, "c": 3.0, "d": 2.0}
    )

    assert weights == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}


# --- quality weighting and the cap --------------------------------------------------------


def test_quality_weights_are_normalised_scores() -> None:
    weights = ContributionPolicy().weights({"vn": 0.90, "ch": 0.86, "in": 0.88})

    # total 2.64: 0.90/2.64 = 15/44, 0.86/2.64 = 43/132, 0.88/2.64 = 1/3
    assert weights == pytest.approx({"vn": 15 / 44, "ch": 43 / 132, "in": 1 / 3}, abs=1e-15)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)


def test_demo_policy_weights() -> None:
    policy = ContributionPolicy(quality_floor=0.75, max_node_weight=0.5)

    weights = policy.weights({"vietnam": 0.90, "switzerland": 0.86, "india": 0.88})

    # the 0.5 cap does not bind: the largest share is 15/44 ~ 0.341
    assert weights == pytest.approx(
        {"vietnam": 15 / 44, "switzerland": 43 / 132, "india": 1 / 3}, abs=1e-15
    )


def test_cap_fixes_one_node_and_renormalises_the_rest() -> None:
    policy = ContributionPolicy(max_node_weight=0.4)

    weights = policy.weights({"a": 5.0, "b": 3.0, "c": 1.0, "d": 0.5})

    # shares 10/19, 6/19, 2/19, 1/19: a > 0.4 is fixed at 0.4; the other 0.6 is split
    # 3 : 1 : 0.5 over b, c, d -> 0.4, 2/15, 1/15 (b lands exactly on the cap, not over it)
    assert weights == pytest.approx({"a": 0.4, "b": 0.4, "c": 2 / 15, "d": 1 / 15}, abs=1e-12)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)


def test_cap_is_applied_repeatedly() -> None:
    policy = ContributionPolicy(max_node_weight=0.35)

    weights = policy.weights({"a": 10.0, "b": 6.0, "c": 2.0, "d": 2.0})

    # pass 1: shares .5 .3 .1 .1 -> a fixed at .35; the other .65 split 6:2:2 -> b .39 c .13 d .13
    # pass 2: b > .35 -> fixed; the other .30 split 2:2 -> c .15 d .15
    assert weights == pytest.approx({"a": 0.35, "b": 0.35, "c": 0.15, "d": 0.15}, abs=1e-12)


def test_cap_that_does_not_bind_changes_nothing() -> None:
    scores = {"a": 4.0, "b": 3.0, "c": 3.0}

    capped = ContributionPolicy(max_node_weight=0.4).weights(scores)

    assert capped == pytest.approx({"a": 0.4, "b": 0.3, "c": 0.3}, abs=1e-15)
    assert capped == pytest.approx(ContributionPolicy().weights(scores), abs=1e-15)


def test_cap_exactly_feasible_with_k_times_cap_equal_to_one() -> None:
    assert ContributionPolicy(max_node_weight=0.5).weights({"a": 3.0, "b": 1.0}) == (
        pytest.approx({"a": 0.5, "b": 0.5}, abs=1e-12)
    )
    assert ContributionPolicy(max_node_weight=1 / 3).weights({"a": 5.0, "b": 1.0, "c": 1.0}) == (
        pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=1e-12)
    )


def test_single_node_takes_everything_under_the_default_cap() -> None:
    assert ContributionPolicy().weights({"only": 0.3}) == {"only": 1.0}


@pytest.mark.parametrize("cap", [0.2, 0.25, 0.3, 1 / 3, 0.35, 0.4, 0.5, 0.6, 0.75, 1.0])
def test_weights_sum_to_one_and_respect_a_feasible_cap(cap: float) -> None:
    rng = random.Random(f"policy-{cap}")
    policy = ContributionPolicy(max_node_weight=cap)
    checked = 0
    for _ in range(300):
        k = rng.randint(1, 10)
        scores = {
            f"n{i}": rng.choice([rng.uniform(1e-3, 10.0), rng.expovariate(0.5) + 1e-6])
            for i in range(k)
        }
        weights = policy.weights(scores)
        if k * cap < 1:
            assert weights == {}
            continue
        checked += 1
        assert set(weights) == set(scores)
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
        # The cap holds up to float rounding of the final renormalisation (an ulp or so).
        assert max(weights.values()) <= cap + 1e-12
        assert min(weights.values()) > 0
        # A higher score never gets a smaller weight.
        ranked = sorted(scores, key=scores.__getitem__)
        for low, high in zip(ranked, ranked[1:], strict=False):
            assert weights[low] <= weights[high] + 1e-12
    assert checked > 0


# --- infeasible cap ------------------------------------------------------------------------


def test_infeasible_cap_integrates_nothing_and_says_why() -> None:
    policy = ContributionPolicy(quality_floor=0.5, max_node_weight=0.4)

    decision = policy.decide({"a": 0.9, "low": 0.1, "b": 0.8})

    why = (
        "cap max_node_weight=0.4 cannot hold with 2 accepted node(s); it needs at least 3, "
        "so nothing was integrated this round"
    )
    assert decision.weights == {}
    assert decision.rejection_reasons == {
        "low": "quality score 0.1 is below the floor 0.5",
        "a": why,
        "b": why,
    }
    assert policy.weights({"a": 0.9, "low": 0.1, "b": 0.8}) == {}


@pytest.mark.parametrize(
    ("cap", "k", "need"),
    [(0.5, 1, 2), (0.4, 2, 3), (1 / 3, 2, 3), (0.25, 3, 4), (0.3, 3, 4), (0.1, 9, 10)],
)
def test_infeasible_cap_names_the_quorum(cap: float, k: int, need: int) -> None:
    for weighting in ("quality", "equal"):
        policy = ContributionPolicy(max_node_weight=cap, weighting=weighting)
        decision = policy.decide({f"n{i}": 1.0 + i for i in range(k)})

        assert decision.weights == {}
        assert len(decision.rejection_reasons) == k
        for reason in decision.rejection_reasons.values():
            assert f"cannot hold with {k} accepted node(s); it needs at least {need}," in reason


def test_policy_decision_is_frozen() -> None:
    decision = PolicyDecision({"a": 1.0})
    assert decision.rejection_reasons == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.weights = {}  # type: ignore[misc]
