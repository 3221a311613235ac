"""The evidence's claims, checked on hand-made numbers."""

from __future__ import annotations

import pytest

from evidence import claims

CROSS = {
    "base": {"A": 2.0, "B": 2.0},
    "round0": {"A": 5.0, "B": 5.0},
    "a": {"A": 1.5, "B": 3.0},
    "b": {"A": 3.0, "B": 1.8},
}
NODES = {"a": "A", "b": "B"}


def test_falls_for_every_jurisdiction_compares_the_last_base_with_round_0() -> None:
    assert claims.falls_for_every_jurisdiction(
        [{"A": 3.0, "B": 3.0}, {"A": 3.5, "B": 2.0}, {"A": 2.9, "B": 2.5}]
    )
    assert not claims.falls_for_every_jurisdiction([{"A": 3.0, "B": 3.0}, {"A": 2.0, "B": 3.0}])


def test_falls_every_round_needs_each_step_down_everywhere() -> None:
    assert claims.falls_every_round([{"A": 3.0}, {"A": 2.5}, {"A": 2.4}])
    assert not claims.falls_every_round([{"A": 3.0}, {"A": 2.5}, {"A": 2.6}])


def test_a_sovereign_model_wins_its_own_jurisdiction_against_every_other_row() -> None:
    assert claims.own_jurisdiction_winners(CROSS, NODES) == {"a": True, "b": True}
    beaten = {**CROSS, "base": {"A": 1.4, "B": 2.0}}
    assert claims.own_jurisdiction_winners(beaten, NODES) == {"a": False, "b": True}
    tied = {**CROSS, "base": {"A": 2.0, "B": 1.8}}  # a tie is not a win
    assert claims.own_jurisdiction_winners(tied, NODES) == {"a": True, "b": False}


def test_the_base_has_the_lowest_mean_and_beats_round_0_everywhere() -> None:
    assert claims.base_lowest_mean(CROSS)  # 2.0 against 5.0, 2.25, 2.4
    assert not claims.base_lowest_mean({**CROSS, "a": {"A": 1.5, "B": 2.4}})  # 1.95
    assert claims.better_everywhere(CROSS["base"], CROSS["round0"])
    assert not claims.better_everywhere({"A": 1.0, "B": 5.0}, CROSS["round0"])


@pytest.mark.parametrize(
    ("excess", "undefended", "harmed", "held"),
    [(0.5, 0.5, True, False), (0.1, 0.5, True, True), (0.01, 0.5, False, True)],
)
def test_harm_is_visible_past_a_threshold_and_contained_within_a_share(
    excess: float, undefended: float, harmed: bool, held: bool
) -> None:
    assert claims.harm(3.5, 3.0) == pytest.approx(0.5)
    assert claims.visibly_harmed(excess) is harmed
    assert claims.contained(excess, undefended) is held


def _validation(scales: list[float], committed: float | None, over: list[str]) -> dict[str, object]:
    return {
        "attempts": [{"scale": s} for s in scales],
        "committed_scale": committed,
        "committed_over": over,
    }


def test_the_fallback_says_what_validation_did_in_a_round() -> None:
    assert claims.fallback(None) == "not validated"
    assert claims.fallback(_validation([1.0], 1.0, [])) == "committed the full step"
    assert (
        claims.fallback(_validation([1.0, 0.5, 0.25], 0.25, []))
        == "committed at step 0.25 after 3 tries"
    )
    assert (
        claims.fallback(_validation([1.0, 0.5, 0.25, 0.125], 1.0, ["india"]))
        == "committed the full step over the lone objection of india after 4 tries"
    )
    assert (
        claims.fallback(_validation([1.0, 0.5, 0.25, 0.125], None, []))
        == "not committed after 4 tries (base unchanged)"
    )
    dropped = {**_validation([1.0, 0.5, 1.0, 1.0], 1.0, []), "dropped": "mallory"}
    assert claims.fallback(dropped) == "committed without mallory after 4 tries"


def test_rises_past_the_tolerance_are_each_round_s_step_on_each_jurisdiction() -> None:
    bases = [{"A": 3.0, "B": 3.0}, {"A": 3.01, "B": 2.0}, {"A": 3.5, "B": 2.005}]

    rises = claims.rises_past(bases, 0.01)

    # 3.01 - 3.0 is not past 0.01 (within float error of it); B's +0.005 is within it
    assert [(r["round"], r["jurisdiction"]) for r in rises] == [(2, "A")]
    assert rises[0]["rise"] == pytest.approx(0.49)
    assert claims.rises_past(bases, 0.5) == []
