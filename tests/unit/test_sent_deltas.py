"""A member's delta is counted once: one it sent in an earlier round is refused."""

from __future__ import annotations

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.sent_deltas import ReplayedDelta, SentDeltas

A, B = "a" * 64, "b" * 64


def _record(round_num: int, **digests: str) -> pb.RoundRecord:
    contributions = [
        pb.SovereignContribution(node_id=node, round_num=round_num, weight_delta_sha256=digest)
        for node, digest in digests.items()
    ]
    return pb.RoundRecord(
        result=pb.ConsortiumRoundResult(round_num=round_num, contributions=contributions)
    )


def test_a_delta_from_the_journal_is_refused_in_a_later_round_naming_its_first() -> None:
    sent = SentDeltas([_record(1, vietnam=A), _record(2, vietnam=A, india=B)])
    with pytest.raises(ReplayedDelta) as refused:
        sent.check("vietnam", A, 3)
    assert str(refused.value) == (
        f"node vietnam sent this delta (sha256 {A[:16]}…) in round 1 already: "
        "a delta is counted once"
    )
    sent.check("vietnam", B, 3)  # another member's digest is not this member's replay
    sent.check("switzerland", A, 3)
    assert len(sent) == 2


def test_the_same_round_run_again_is_not_a_replay() -> None:
    # a round that did not commit runs again under its number; an honest node, seeded by
    # round, trains the same delta again
    sent = SentDeltas()
    sent.add("vietnam", A, 4)
    sent.check("vietnam", A, 4)
    with pytest.raises(ReplayedDelta):
        sent.check("vietnam", A, 5)


def test_a_delta_that_never_crossed_the_wire_is_not_remembered() -> None:
    # a contribution rejected on its header has no digest in the round's record
    sent = SentDeltas([_record(1, vietnam="")])
    assert len(sent) == 0
    sent.check("vietnam", "", 2)
