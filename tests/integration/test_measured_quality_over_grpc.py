"""Quality measured, not claimed, over the services: a coordinator whose consortium file
names a reference corpus trains each round's base on it and weighs every member by its
delta against that update. The issue's reversed member (its honest delta times -9.9,
claiming quality 1.0) passes the norm bound and scores 0; the honest members are weighed by
what their deltas do; every result labels its scores as measured and keeps the claims."""

from __future__ import annotations

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.journal import read_records
from tapestry.training.consortium import ModelSpec, SovereignTrainingNode

from .conftest import CORPORA, SCORES, TRAINING, round_run
from .fake_nodes import ReversedNode, serve

pytestmark = pytest.mark.slow  # a whole consortium of training processes

HONEST = ["vietnam", "switzerland", "india"]
SEED = 2026  # LocalConsortium's


def _reversed_member() -> ReversedNode:
    """Trains on Vietnam's corpus as Vietnam's node would, and sends the reverse."""
    corpus = [list(line.encode()) for line in CORPORA["vietnam"]]
    trainer = SovereignTrainingNode(
        "reversed",
        "Nowhere",
        ModelSpec().build(SEED),
        corpus,
        1.0,
        TRAINING["local_epochs"],
        TRAINING["lr"],
        TRAINING["batch_size"],
        seed=SEED,
    )
    return ReversedNode("reversed", trainer)


def _measured(result: pb.ConsortiumRoundResult) -> None:
    """The reversed member scored 0 and got no weight; the honest members were weighed by
    measured scores; every score is labelled measured and every claim kept."""
    assert list(result.accepted_nodes) == HONEST
    assert list(result.rejected_nodes) == ["reversed"]
    assert result.rejection_reasons["reversed"] == "quality score 0.0 is not > 0"
    assert "reversed" not in result.contribution_weights
    assert result.quality_scores["reversed"] == 0.0
    assert all(0 < result.quality_scores[n] <= 1 for n in HONEST)
    assert dict(result.quality_sources) == dict.fromkeys(
        [*HONEST, "reversed"], pb.QUALITY_SOURCE_MEASURED
    )
    claims = {c.node_id: c.quality_score for c in result.contributions}
    assert claims == {**SCORES, "reversed": 1.0}
    assert sum(result.contribution_weights.values()) == pytest.approx(1.0, abs=1e-12)


def test_the_reversed_member_scores_zero_when_the_coordinator_measures_quality(
    consortium_factory, tmp_path
):
    public = tmp_path / "public"  # the consortium's agreed corpus: a folder of text
    public.mkdir()
    for node_id, lines in CORPORA.items():
        (public / f"{node_id}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    policy = {"max_node_weight": 0.5, "reference_corpus": str(public), "reference": TRAINING}
    with serve([_reversed_member()]) as members:
        consortium = consortium_factory(policy=policy, extra_members=members, tls=False)
        with consortium.client() as client:
            first = client.run_round()
        shown = round_run(consortium)  # the second round, through the CLI
        with consortium.client() as client:
            second = client.list_rounds()[-1]

    _measured(first)
    assert shown.returncode == 0, shown.stderr
    said = " ".join(shown.stdout.split())
    assert "0.00 (self 1.00)" in said  # the reversed member's measured score, and its claim
    assert (
        "quality: measured against the reference corpus (vietnam, switzerland, india, "
        "reversed)" in said
    )
    assert second.round_num == 2
    _measured(second)
    # The journal records where each score came from.
    journal = read_records(consortium.coordinator_data_dir / "rounds")
    assert [dict(r.result.quality_sources) for r in journal] == [dict(first.quality_sources)] * 2
