"""Every round, each node evaluates the incoming base and its new sovereign model on its own
held-out split; GetRound, the journal and `tapestry rounds` carry the numbers (issue 9 §3).

Run over the demo's corpora (several KB per jurisdiction), where the tiny model does learn
what a held-out line looks like: the numbers below are facts about these corpora."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from tapestry.cli import main
from tapestry.cli.report import WIDTH
from tapestry.config import NodeConfig, load_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.corpus import load_node_corpus
from tapestry.demo import DEMO_NODES
from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec
from tapestry.training.consortium import ModelSpec
from tapestry.training.consortium.local.evaluation import heldout_loss
from tapestry.training.consortium.local.node import pad_corpus
from tapestry.wire.codec import message_from_json

from .conftest import POLICY

pytestmark = pytest.mark.slow  # whole consortia of training processes

NODES = [spec.node_id for spec in DEMO_NODES]
# A few large steps per round: quick, and enough to learn each corpus's bytes.
TRAINING = {"local_epochs": 1, "lr": 0.05, "batch_size": 8, "max_seq_len": 128}


@pytest.fixture(scope="module")
def demo_consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalConsortium]:
    root = tmp_path_factory.mktemp("heldout")
    specs = [
        LocalNodeSpec(s.node_id, s.jurisdiction, s.quality_score, s.corpus, dict(TRAINING))
        for s in DEMO_NODES
    ]
    with LocalConsortium(root, specs, policy=POLICY) as consortium:
        yield consortium


def test_get_round_carries_each_nodes_evaluation_of_its_own_heldout_split(
    demo_consortium: LocalConsortium,
) -> None:
    with demo_consortium.client() as client:
        ran = [client.run_round(), client.run_round()]
        got = [client.get_round(1), client.get_round(2)]

    assert [list(r.contributions) for r in got] == [list(r.contributions) for r in ran]
    first, second = ({c.node_id: c.evaluation for c in r.contributions} for r in got)
    for node_id in NODES:
        config = load_config(demo_consortium.node_config_path(node_id), NodeConfig)
        inputs, targets = pad_corpus(load_node_corpus(config).heldout)
        # Round 1's base is the consortium's initial base, built from its spec and seed.
        initial = heldout_loss(ModelSpec().build(config.seed), inputs, targets, batch_size=1)
        one, two = first[node_id], second[node_id]
        assert one.tokens == two.tokens == initial[1] == int((targets != -100).sum())
        assert one.base_loss == pytest.approx(initial[0], rel=1e-6)
        for evaluation in (one, two):
            # Training on its own lines helps a node predict its held-out lines ...
            assert 0 < evaluation.sovereign_loss < evaluation.base_loss
            assert evaluation.base_perplexity == math.exp(evaluation.base_loss)
            assert evaluation.sovereign_perplexity == math.exp(evaluation.sovereign_loss)
        # ... and the shared base, integrated from every member, got better for everyone.
        assert two.base_loss < one.base_loss
    # What GetRound serves is what the coordinator journaled.
    record_path = demo_consortium.coordinator_data_dir / "rounds" / "round-000002.json"
    record = message_from_json(record_path.read_text(encoding="utf-8"), pb.RoundRecord)
    assert list(record.result.contributions) == list(got[1].contributions)


def test_tapestry_rounds_shows_the_heldout_losses_within_80_columns(
    demo_consortium: LocalConsortium,
) -> None:
    with demo_consortium.client() as client:
        listed_rounds = client.list_rounds()  # the rounds of the test above, when it ran
        newest = listed_rounds[-1] if listed_rounds else client.run_round()
    address = ["--coordinator", demo_consortium.coordinator_address]
    runner = CliRunner()
    env = demo_consortium.cli_env()

    table = runner.invoke(main, ["rounds", *address], env=env)
    as_json = runner.invoke(main, ["rounds", *address, "--json"], env=env)

    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert [line for line in lines if len(line) > WIDTH] == []
    assert "Held-out evaluation" in table.output
    for c in newest.contributions:
        e = c.evaluation
        row = f"{newest.round_num} {c.node_id} {e.base_loss:.4f} {e.sovereign_loss:.4f}"
        assert any(" ".join(line.split()).startswith(row) for line in lines), row
    assert as_json.exit_code == 0, as_json.output
    listed = json.loads(as_json.output)
    evaluation = listed[-1]["contributions"][0]["evaluation"]
    assert evaluation["tokens"] == newest.contributions[0].evaluation.tokens
    assert evaluation["sovereign_loss"] == newest.contributions[0].evaluation.sovereign_loss
