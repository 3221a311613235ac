"""``scripts/evidence`` on the CI size: the three files, the documented shape, finite
numbers. The full run (gpt, 10 rounds) is the documented command, not a test."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from evidence import claims
from evidence.__main__ import main
from evidence.governance import validation_from_core, validation_from_pb
from evidence.heldout import HeldOutScorer
from evidence.inprocess import honest_node, run_core
from evidence.run import run_evidence
from evidence.services import run_services
from evidence.settings import SMOKE
from tapestry.demo import DEMO_POLICY
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.mark.slow
def test_evidence_writes_the_report_and_the_documented_json(tmp_path: Path) -> None:
    returned = run_evidence(SMOKE, tmp_path, say=lambda _: None)

    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "(N+1)" in html
    evidence = json.loads((tmp_path / "evidence.json").read_text())
    assert evidence == returned
    nodes = {"vietnam": "Vietnam", "switzerland": "Switzerland", "india": "India"}
    assert evidence["nodes"] == nodes
    places = set(nodes.values())
    assert [r["round"] for r in evidence["rounds"]] == [1, 2]
    for row in evidence["rounds"]:
        assert set(row["base_heldout_loss"]) == places
    # The nodes measure in round r the base of round r - 1: the same numbers.
    assert (
        evidence["rounds"][1]["received_base_heldout_loss"]
        == evidence["rounds"][0]["base_heldout_loss"]
    )
    assert (
        evidence["rounds"][0]["received_base_heldout_loss"] == evidence["round0_base_heldout_loss"]
    )
    assert list(evidence["cross_eval"]) == ["base", "round0", *nodes]
    for losses in evidence["cross_eval"].values():
        assert set(losses) == places
    assert evidence["cross_eval"]["base"] == evidence["rounds"][-1]["base_heldout_loss"]
    assert set(evidence["strategies"]) == {"fedavg", "diloco", "median"}
    assert set(evidence["poisoning"]["runs"]) == {"fedavg", "fedavg_clipped", "median"}
    # The service run validates (the consortium file's default): each round says what
    # validation did, and the rule's promise is checked on the evidence's own scores.
    for row in evidence["rounds"]:
        assert row["validation"]["rule"] == "no_regression"
        assert row["validation"]["tolerance"] == 0.01
        assert row["fallback"].startswith(("committed", "not committed"))
    validation = evidence["validation"]
    assert [r["round"] for r in validation["rounds"]] == [1, 2]
    assert validation["tolerance"] == 0.01
    assert evidence["checks"]["validated_base_never_rises_past_tolerance"] is (
        validation["rises_past_tolerance"] == []
    )
    assert len(validation["unvalidated"]["mean_per_round"]) == 3
    reversed_member = evidence["reversed_member"]
    assert reversed_member["hostile_delta"] == "-9.9 x its own trained delta"
    runs = reversed_member["runs"]
    assert set(runs) == {
        "self_reported", "measured", "validated", "validated_drop_one", "evaluated",
    }  # fmt: skip
    for run in runs.values():
        assert [r["round"] for r in run["per_round"]] == [1]
    assert runs["self_reported"]["per_round"][0]["quality_sources"]["mallory"] == "self_reported"
    assert runs["measured"]["per_round"][0]["quality_sources"]["mallory"] == "measured"
    assert runs["validated"]["per_round"][0]["fallback"] != "not validated"
    assert runs["validated_drop_one"]["per_round"][0]["fallback"] != "not validated"
    evaluated = runs["evaluated"]["per_round"][0]
    assert set(evaluated["quality_sources"].values()) == {"evaluated"}
    assert evaluated["fallback"].startswith("scored by probes without each of 4 members; ")
    assert "Member-validated commit" in html and "measured against claimed" in html
    assert all(isinstance(v, bool | dict) for v in evidence["checks"].values())
    numbers = _numbers({k: v for k, v in evidence.items() if k != "run"})
    assert numbers and all(math.isfinite(n) for n in numbers)


def test_evidence_refuses_an_out_dir_with_an_earlier_consortium(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "consortium").mkdir()

    assert main([str(tmp_path), "--smoke"]) == 1

    assert capsys.readouterr().err == (
        f"scripts/evidence: {tmp_path / 'consortium'} exists (an earlier run's consortium): "
        "give a new OUT_DIR or remove it\n"
    )


@pytest.mark.slow
def test_the_in_process_strategies_start_from_the_service_runs_rounds(tmp_path: Path) -> None:
    """The comparison is fair: fedavg on the in-process core, with the evidence's nodes and
    the service run's acceptance policy (the default), scores exactly what the service run
    scores, round for round."""
    service = run_services(SMOKE, tmp_path / "consortium", say=lambda _: None)
    spec = service.members[0].config.model
    scorer = HeldOutScorer(spec, service.members, SMOKE.seed)
    nodes = [honest_node(m) for m in service.members]

    core = run_core(
        spec, DEMO_POLICY, nodes, scorer, SMOKE.rounds, SMOKE.seed, lambda _: None, "fedavg",
        acceptance=AcceptancePolicy(),
    )  # fmt: skip

    assert core.base_loss == service.base_loss
    assert [claims.fallback(validation_from_core(r.validation)) for r in core.results] == [
        claims.fallback(validation_from_pb(r)) for r in service.rounds
    ]
