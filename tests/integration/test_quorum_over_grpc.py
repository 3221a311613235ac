"""Over the services: a round that misses its quorum is aborted, recorded as aborted with the
base untouched, reported as such by RunRound, and `tapestry round run` exits 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.demo.launcher import LocalConsortium
from tapestry.training.consortium import state_digest

from .conftest import POLICY, round_run
from .fake_nodes import FakeNode, serve

REASON = (
    "quorum not met: 1 of 2 node(s) contributed and min_nodes is 2; nothing was integrated "
    "and the base is unchanged"
)


def test_a_round_short_of_its_quorum_is_aborted_and_recorded_with_the_base_untouched(
    tmp_path: Path,
):
    """Cap 0.5 and no min_nodes: the quorum is 2; one of the two members sends NaN."""
    with (
        serve([FakeNode("alpha"), FakeNode("broken", "nan")]) as members,
        LocalConsortium(
            tmp_path, [], policy=POLICY, extra_members=members, tls=False
        ) as consortium,
    ):
        with consortium.client() as client:
            _, base_before = client.get_base()
            progress: list[pb.RoundProgress] = []
            result = client.run_round(progress.append)
            rounds = client.list_rounds()
            round_num, base_after = client.get_base()
        consortium.restart_coordinator()
        with consortium.client() as client:
            resumed_at, base_resumed = client.get_base()
            listed_after_restart = client.list_rounds()

    assert result.aborted_reason == REASON
    assert (list(result.accepted_nodes), list(result.rejected_nodes)) == ([], [])
    assert list(result.failed_nodes) == ["broken"]
    assert [c.node_id for c in result.contributions] == ["alpha"]
    assert result.shared_base_sha256 == result.previous_base_sha256 == state_digest(base_before)
    assert [(p.stage, p.detail) for p in progress if not p.node_id] == [
        (pb.ROUND_STAGE_ABORTED, REASON)
    ]
    assert [(r.round_num, r.aborted_reason) for r in rounds] == [(1, REASON)]
    assert round_num == resumed_at == 1
    assert state_digest(base_after) == state_digest(base_resumed) == state_digest(base_before)
    assert [r.aborted_reason for r in listed_after_restart] == [REASON]


@pytest.mark.slow
def test_round_run_exits_3_with_one_line_when_aborted_and_0_when_committed(tmp_path: Path):
    alpha, beta = FakeNode("alpha"), FakeNode("beta", "nan")
    with (
        serve([alpha, beta]) as members,
        LocalConsortium(
            tmp_path, [], policy=POLICY, extra_members=members, tls=False
        ) as consortium,
    ):
        aborted = round_run(consortium)
        aborted_json = round_run(consortium, "--json")
        beta.behaviour = "honest"
        committed = round_run(consortium)

    for ran, round_num in ((aborted, 1), (aborted_json, 2)):
        assert ran.returncode == 3, ran.stderr
        assert ran.stderr == f"Error: round {round_num} was aborted: {REASON}\n"
    assert "ABORTED:" in aborted.stdout and "alpha" in aborted.stdout
    assert '"aborted_reason": "quorum not met: 1 of 2' in aborted_json.stdout
    assert committed.returncode == 0, committed.stderr
    assert committed.stderr == ""
