"""A held-out evaluation crosses the wire and the journal as numbers, exactly, and the CLI
shows it within 80 columns (issue 9 §3)."""

from __future__ import annotations

import io
import json
import math

import torch
from rich.cells import cell_len

from tapestry.cli import report
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium import (
    ConsortiumRoundResult,
    HeldOutEvaluation,
    SovereignContribution,
)
from tapestry.wire.codec import (
    contribution_from_proto,
    contribution_to_proto,
    evaluation_from_proto,
    evaluation_to_proto,
    message_from_json,
    message_to_dict,
    message_to_json,
    round_result_to_proto,
)

# Doubles whose shortest decimal form is long: any rounding on the way would show.
EVALUATION = HeldOutEvaluation(
    base_loss=5.545177444479562,
    base_perplexity=math.exp(5.545177444479562),
    sovereign_loss=1 / 3,
    sovereign_perplexity=math.exp(1 / 3),
    tokens=(1 << 40) + 7,  # past 32 bits
)


def contribution(node_id: str, evaluation: HeldOutEvaluation | None) -> SovereignContribution:
    return SovereignContribution(
        node_id, 3, {"w": torch.zeros(2)}, 0.9, 1234, {"loss": 4.5}, evaluation=evaluation
    )


def round_result(*contributions: SovereignContribution) -> ConsortiumRoundResult:
    return ConsortiumRoundResult(
        round_num=3,
        previous_base_sha256="a" * 64,
        shared_base_sha256="b" * 64,
        previous_base_state={},
        shared_base_state={},
        accepted_nodes=[c.node_id for c in contributions],
        rejected_nodes=[],
        contribution_weights={c.node_id: 1 / len(contributions) for c in contributions},
        contributions={c.node_id: c for c in contributions},
    )


def test_an_evaluation_crosses_the_wire_exactly() -> None:
    msg = evaluation_to_proto(EVALUATION)
    back = evaluation_from_proto(pb.HeldOutEvaluation.FromString(msg.SerializeToString()))
    assert back == EVALUATION


def test_a_contribution_carries_its_evaluation_or_none() -> None:
    for evaluation in (EVALUATION, None):
        wire = contribution_to_proto(contribution("vn", evaluation))
        assert wire.HasField("evaluation") == (evaluation is not None)
        back = contribution_from_proto(
            pb.SovereignContribution.FromString(wire.SerializeToString()), {}
        )
        assert back.evaluation == evaluation


def test_the_journal_and_get_round_carry_every_evaluation() -> None:
    """GetRound serves the journal's record, which is this proto: what is journaled is
    what is served."""
    result = round_result(contribution("vn", EVALUATION), contribution("ch", None))
    record = pb.RoundRecord(result=round_result_to_proto(result))

    text = message_to_json(record)
    back = message_from_json(text, pb.RoundRecord)

    assert back == record
    vn, ch = back.result.contributions
    assert evaluation_from_proto(vn.evaluation) == EVALUATION
    assert not ch.HasField("evaluation")
    as_dict = message_to_dict(back.result)["contributions"][0]["evaluation"]
    assert as_dict == {
        "base_loss": EVALUATION.base_loss,
        "base_perplexity": EVALUATION.base_perplexity,
        "sovereign_loss": 1 / 3,
        "sovereign_perplexity": math.exp(1 / 3),
        "tokens": (1 << 40) + 7,  # a JSON number, as every count in --json
    }
    assert '"tokens": 1099511627783' in json.dumps(as_dict)


def rendered(renderable: object) -> list[str]:
    out = report.console(io.StringIO())  # not a terminal: 80 columns
    out.print(renderable)
    return out.file.getvalue().splitlines()  # type: ignore[attr-defined]


def assert_fits(lines: list[str]) -> None:
    assert [line for line in lines if cell_len(line) > report.WIDTH] == []


def wire_round(round_num: int, names: list[str]) -> pb.ConsortiumRoundResult:
    msg = round_result_to_proto(round_result(*(contribution(n, EVALUATION) for n in names)))
    msg.round_num = round_num
    return msg


def test_the_round_table_shows_each_nodes_heldout_change() -> None:
    names = ["vietnam", "switzerland-federal-archive", "india"]
    lines = rendered(report.round_table(wire_round(123456, names)))

    assert_fits(lines)
    text = " ".join(" ".join(lines).split())
    assert "held-out" in text
    assert "vietnam accepted 0.3333 0.90 1234 4.5000 5.545 -> 0.333" in text


def test_the_heldout_table_lists_every_node_of_every_round_within_80_columns() -> None:
    names = ["vietnam", "switzerland-federal-archive-of-the-confederation", "india"]
    rounds = [wire_round(n, names) for n in (1, 2, 1234567)]
    rounds.insert(1, pb.ConsortiumRoundResult(round_num=9, rolled_back_to=0))  # no evaluation

    table = report.heldout_table(rounds)

    assert table is not None and table.row_count == 9
    lines = rendered(table)
    assert_fits(lines)
    text = " ".join(" ".join(lines).split())
    assert "base loss own loss base ppl own ppl tokens" in text
    assert "1234567 vietnam 5.5452 0.3333 256 1.3956 1099.5G" in text
    assert report.heldout_table([pb.ConsortiumRoundResult(round_num=1)]) is None
