"""Member-validated commit decided on fixed evaluations: accept, shrink, abort (base
unchanged), a lone objection committed over, and what a lying member can and cannot do."""

from __future__ import annotations

import math

import pytest

from tapestry.limits import MAX_HELDOUT_LOSS
from tapestry.training.consortium.governance.acceptance import (
    AcceptancePolicy,
    AcceptanceRule,
    validate,
)
from tapestry.training.consortium.messages import MemberEvaluation

BASE = {"vietnam": 3.0, "switzerland": 3.2, "india": 3.1}


def _evaluations(changes: dict[str, float]) -> list[MemberEvaluation]:
    return [MemberEvaluation(n, BASE[n], BASE[n] + change) for n, change in changes.items()]


def _by_scale(table: dict[float, dict[str, float]]):
    asked: list[float] = []

    def evaluate(scale: float) -> list[MemberEvaluation]:
        asked.append(scale)
        return _evaluations(table[scale])

    return evaluate, asked


ALL_BETTER = {"vietnam": -0.2, "switzerland": -0.1, "india": -0.3}


def test_a_candidate_every_member_finds_better_is_committed_at_once() -> None:
    evaluate, asked = _by_scale({1.0: ALL_BETTER})
    outcome = validate(AcceptancePolicy(), evaluate)
    assert (outcome.scale, asked, outcome.committed_over) == (1.0, [1.0], ())
    assert outcome.reason == "committed at step 1: no held-out loss rose by more than 0.01"


def test_a_rise_within_the_tolerance_is_no_objection() -> None:
    evaluate, _ = _by_scale({1.0: {"vietnam": 0.01, "switzerland": -0.1, "india": 0.0}})
    assert validate(AcceptancePolicy(), evaluate).scale == 1.0


def test_a_rejected_candidate_is_shortened_until_accepted() -> None:
    evaluate, asked = _by_scale(
        {
            1.0: {"vietnam": 0.5, "switzerland": 0.2, "india": -0.3},
            0.5: {"vietnam": 0.05, "switzerland": 0.02, "india": -0.2},
            0.25: {"vietnam": -0.01, "switzerland": 0.0, "india": -0.1},
        }
    )
    outcome = validate(AcceptancePolicy(), evaluate)
    assert (outcome.scale, asked) == (0.25, [1.0, 0.5, 0.25])
    assert [a.verdict.objections for a in outcome.attempts] == [
        ("vietnam", "switzerland"),
        ("vietnam", "switzerland"),
        (),
    ]


def test_two_objectors_through_every_step_abort_the_round() -> None:
    rising = {"vietnam": 0.5, "switzerland": 0.2, "india": -0.3}
    evaluate, asked = _by_scale({s: rising for s in (1.0, 0.5, 0.25, 0.125)})
    outcome = validate(AcceptancePolicy(), evaluate)
    assert outcome.scale is None and asked == [1.0, 0.5, 0.25, 0.125]
    assert outcome.reason == (
        "not committed: held-out loss rose past 0.01: vietnam +0.5, switzerland +0.2 "
        "(after 4 tries)"
    )


def test_a_lone_objector_cannot_veto_the_round_it_is_committed_over_and_recorded() -> None:
    liar = {"vietnam": 9.0, "switzerland": -0.1, "india": -0.3}  # objects to everything
    evaluate, asked = _by_scale({s: liar for s in (1.0, 0.5, 0.25, 0.125)})
    outcome = validate(AcceptancePolicy(), evaluate)
    assert (outcome.scale, outcome.committed_over) == (1.0, ("vietnam",))
    assert len(asked) == 4  # the fallback ran, as for any rejection
    assert outcome.reason.startswith("committed over the lone objection of vietnam")


def test_the_only_member_that_evaluated_is_no_lone_objector_to_commit_over() -> None:
    # The others did not answer (no held-out split, a timeout): nobody found the candidate
    # acceptable, and the one evaluation there is says it is worse. Committing over it
    # would make the only evidence the round has the one thing it ignores.
    only = {"vietnam": 0.5}
    evaluate, asked = _by_scale({s: only for s in (1.0, 0.5, 0.25, 0.125)})
    outcome = validate(AcceptancePolicy(), evaluate)
    assert (outcome.scale, outcome.committed_over) == (None, ())
    assert len(asked) == 4
    # ...nor is a member whose every other step found no one else to answer
    table = {s: {"vietnam": 0.5, "india": -0.1} for s in (1.0, 0.5, 0.25)} | {0.125: only}
    evaluate, _ = _by_scale(table)
    assert validate(AcceptancePolicy(), evaluate).scale is None


def test_a_lone_objector_can_shrink_the_step_but_no_further_than_max_halvings() -> None:
    # objects to the full and the half step only: the quarter step is committed
    table = {
        1.0: {"vietnam": 1.0, "switzerland": -0.1, "india": -0.3},
        0.5: {"vietnam": 1.0, "switzerland": -0.05, "india": -0.2},
        0.25: {"vietnam": -0.01, "switzerland": -0.02, "india": -0.1},
    }
    evaluate, _ = _by_scale(table)
    assert validate(AcceptancePolicy(), evaluate).scale == 0.25


def test_objectors_that_change_between_steps_are_not_a_lone_objection() -> None:
    table = {
        1.0: {"vietnam": 1.0, "switzerland": -0.1, "india": -0.3},
        0.5: {"vietnam": -0.1, "switzerland": 0.5, "india": -0.2},
    }
    evaluate, _ = _by_scale(table)
    outcome = validate(AcceptancePolicy(max_halvings=1), evaluate)
    assert (outcome.scale, outcome.committed_over) == (None, ())


def test_a_flattering_evaluation_does_not_hide_another_members_rise() -> None:
    table = {s: {"vietnam": -2.5, "switzerland": 0.4, "india": 0.3} for s in (1.0, 0.5)}
    evaluate, _ = _by_scale(table)
    outcome = validate(AcceptancePolicy(max_halvings=1), evaluate)
    assert outcome.scale is None
    assert outcome.attempts[0].verdict.objections == ("switzerland", "india")


def test_no_halvings_means_the_full_candidate_or_nothing() -> None:
    evaluate, asked = _by_scale({1.0: {"vietnam": 0.5, "switzerland": 0.2, "india": 0.0}})
    assert validate(AcceptancePolicy(max_halvings=0), evaluate).scale is None
    assert asked == [1.0]


@pytest.mark.parametrize(
    ("rule", "changes", "accepted"),
    [
        (AcceptanceRule.MEAN_IMPROVES, {"vietnam": 0.5, "switzerland": -0.3, "india": -0.3}, True),
        (AcceptanceRule.MEAN_IMPROVES, {"vietnam": 0.5, "switzerland": -0.2, "india": -0.2}, False),
        (
            AcceptanceRule.MAJORITY_IMPROVES,
            {"vietnam": 9, "switzerland": -0.1, "india": -0.1},
            True,
        ),
        (
            AcceptanceRule.MAJORITY_IMPROVES,
            {"vietnam": -2.9, "switzerland": 0.1, "india": 0.0},
            False,
        ),
    ],
)
def test_the_other_rules_decide_on_every_members_numbers(rule, changes, accepted) -> None:
    verdict = AcceptancePolicy(rule=rule).judge(_evaluations(changes))
    assert verdict.accepted is accepted
    # rises past the tolerance are recorded as objections whatever the rule
    assert verdict.objections == tuple(n for n, c in changes.items() if c > 0.01)


def test_a_lone_objection_under_another_rule_is_not_committed_over() -> None:
    table = {s: {"vietnam": 9.0, "switzerland": 0.0, "india": 0.0} for s in (1.0, 0.5)}
    evaluate, _ = _by_scale(table)
    policy = AcceptancePolicy(rule=AcceptanceRule.MEAN_IMPROVES, max_halvings=1)
    assert validate(policy, evaluate).scale is None


@pytest.mark.parametrize(
    "loss",
    [
        math.nan,
        math.inf,
        -0.1,
        MAX_HELDOUT_LOSS + 1,
        True,
        "3.0",
        None,
        pytest.param(10**400, id="int-past-floats"),
    ],
)
def test_an_evaluation_is_checked_like_every_other_number(loss) -> None:
    with pytest.raises(ValueError, match="held-out loss|must be a number"):
        MemberEvaluation("vietnam", 3.0, loss)


def test_a_member_counted_twice_or_none_at_all_decides_nothing() -> None:
    policy = AcceptancePolicy()
    with pytest.raises(ValueError, match="counted twice"):
        policy.judge(_evaluations({"vietnam": -1}) * 2)
    assert policy.judge([]).accepted is False


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rule": "unanimous"}, "unanimous"),
        ({"tolerance": -0.01}, "tolerance"),
        ({"tolerance": math.nan}, "tolerance"),
        ({"max_halvings": 11}, "max_halvings"),
        ({"max_halvings": -1}, "max_halvings"),
        ({"max_halvings": 2.0}, "max_halvings"),  # range() would raise in the round
        ({"tolerance": True}, "tolerance"),
        ({"tolerance": "0.01"}, "tolerance"),
    ],
)
def test_an_acceptance_policy_out_of_bounds_is_refused(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        AcceptancePolicy(**fields)


def _dropping(
    table: dict[str, dict[str, float]], steps: dict[float, dict[str, float]] | None = None
):
    """``evaluate_without`` from fixed evaluations: ``table`` by member left out, at the
    full step; ``steps`` by scale, for the shorter steps (the rise of the full one when not
    given: a shorter step changes nothing)."""
    dropped: list[str] = []

    def evaluate_without(node_id: str, scale: float) -> list[MemberEvaluation]:
        dropped.append(node_id if scale == 1.0 else f"{node_id}@{scale:g}")
        return _evaluations(
            table[node_id] if scale == 1.0 else (steps or {}).get(scale, table[node_id])
        )

    return evaluate_without, dropped


ROGUE_ROUND = {s: {"vietnam": 0.5, "switzerland": 0.2, "india": -0.3} for s in (1.0, 0.5)}


def test_drop_one_commits_without_the_contribution_whose_removal_helps_most() -> None:
    evaluate, asked = _by_scale(ROGUE_ROUND)
    without, dropped = _dropping(
        {
            "vietnam": {"vietnam": 0.3, "switzerland": 0.1, "india": -0.2},  # rejected
            "switzerland": {"vietnam": -0.1, "switzerland": -0.05, "india": -0.2},
            "india": {"vietnam": -0.2, "switzerland": -0.15, "india": -0.1},  # lowest median
        }
    )
    policy = AcceptancePolicy(max_halvings=1, drop_one=True)
    outcome = validate(policy, evaluate, drops=["vietnam", "switzerland", "india"],
                       evaluate_without=without)  # fmt: skip

    assert (outcome.scale, outcome.dropped, outcome.committed_over) == (1.0, "india", ())
    assert asked == [1.0, 0.5] and dropped == ["vietnam", "switzerland", "india"]
    assert [a.dropped for a in outcome.attempts] == ["", "", "vietnam", "switzerland", "india"]
    assert [a.verdict.accepted for a in outcome.attempts] == [False, False, False, True, True]
    assert outcome.reason.startswith("committed without india's contribution")


def test_the_dropped_member_cannot_keep_its_delta_in_by_objecting_to_its_removal() -> None:
    evaluate, _ = _by_scale(ROGUE_ROUND)
    without, _ = _dropping(
        {
            "vietnam": {"vietnam": 9.0, "switzerland": -0.1, "india": -0.3},  # its lie alone
            "india": {"vietnam": 0.4, "switzerland": 0.2, "india": -0.3},
        }
    )
    policy = AcceptancePolicy(max_halvings=1, drop_one=True)
    outcome = validate(policy, evaluate, drops=["vietnam", "india"], evaluate_without=without)
    assert (outcome.scale, outcome.dropped, outcome.committed_over) == (
        1.0,
        "vietnam",
        ("vietnam",),
    )


def test_another_members_lone_objection_to_a_drop_still_refuses_it() -> None:
    evaluate, _ = _by_scale(ROGUE_ROUND)
    # Without india, vietnam alone objects: that objection is not india's own, so it stands,
    # at the full step and at half of it.
    objects = {"vietnam": 0.3, "switzerland": -0.1, "india": -0.3}
    without, dropped = _dropping({"india": objects}, {0.5: objects})
    policy = AcceptancePolicy(max_halvings=1, drop_one=True)
    outcome = validate(policy, evaluate, drops=["india"], evaluate_without=without)
    assert outcome.scale is None and outcome.dropped == ""
    assert dropped == ["india", "india@0.5"] and len(outcome.attempts) == 4


def test_when_no_drop_is_accepted_the_nearest_is_shortened_until_accepted() -> None:
    evaluate, _ = _by_scale({**ROGUE_ROUND, 0.25: ROGUE_ROUND[1.0]})
    without, dropped = _dropping(
        {
            "vietnam": {"vietnam": 0.3, "switzerland": 0.1, "india": -0.2},  # median +0.1
            "india": {"vietnam": 0.05, "switzerland": 0.02, "india": -0.2},  # median +0.02
        },
        {
            0.5: {"vietnam": 0.02, "switzerland": 0.0, "india": -0.1},
            0.25: {"vietnam": -0.01, "switzerland": -0.01, "india": -0.05},
        },
    )
    policy = AcceptancePolicy(max_halvings=2, drop_one=True)
    outcome = validate(policy, evaluate, drops=["vietnam", "india"], evaluate_without=without)
    assert dropped == ["vietnam", "india", "india@0.5", "india@0.25"]
    assert (outcome.scale, outcome.dropped) == (0.25, "india")
    assert [(a.dropped, a.scale) for a in outcome.attempts[3:]] == [
        ("vietnam", 1.0), ("india", 1.0), ("india", 0.5), ("india", 0.25),
    ]  # fmt: skip
    assert outcome.reason.startswith("committed without india's contribution at step 0.25")


def test_drop_one_is_off_unless_asked_and_never_tried_before_the_shorter_steps() -> None:
    evaluate, _ = _by_scale(ROGUE_ROUND)
    without, dropped = _dropping({})
    outcome = validate(AcceptancePolicy(max_halvings=1), evaluate, drops=["vietnam"],
                       evaluate_without=without)  # fmt: skip
    assert outcome.scale is None and dropped == []
    accepting, _ = _by_scale({1.0: ALL_BETTER})
    outcome = validate(AcceptancePolicy(drop_one=True), accepting, drops=["vietnam"],
                       evaluate_without=without)  # fmt: skip
    assert outcome.scale == 1.0 and dropped == []


def test_a_drop_candidate_too_few_members_evaluated_is_not_committed() -> None:
    evaluate, _ = _by_scale(ROGUE_ROUND)
    without, _ = _dropping({"vietnam": {"switzerland": -0.1}})
    policy = AcceptancePolicy(max_halvings=1, drop_one=True)
    outcome = validate(policy, evaluate, 2, drops=["vietnam"], evaluate_without=without)
    assert outcome.scale is None


def test_drop_one_must_be_a_boolean() -> None:
    with pytest.raises(ValueError, match="drop_one"):
        AcceptancePolicy(drop_one="yes")  # type: ignore[arg-type]
