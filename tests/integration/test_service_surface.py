"""Health, reflection, Describe and the CLI against real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tapestry.cli.report import WIDTH
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.pki.layout import node_server_name
from tapestry.wire.grpc_plumbing import check_health


@pytest.mark.slow
def test_every_server_is_healthy_and_reflects_its_services(listening_consortium):
    shared_consortium = listening_consortium  # nodes that serve, to be reached
    expected = {
        "coordinator": "tapestry.consortium.v1.CoordinatorService",
        "vietnam": "tapestry.consortium.v1.SovereignNodeService",
    }
    for name, service in expected.items():
        address = shared_consortium.processes[name].address
        credentials = shared_consortium.credentials()
        server_name = None if name == "coordinator" else node_server_name(name)
        assert check_health(address, "", 5.0, credentials, server_name) == "SERVING"
        assert check_health(address, service, 5.0, credentials, server_name) == "SERVING"
        with shared_consortium.channel(name) as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {service, "grpc.health.v1.Health"} <= services


@pytest.mark.slow
def test_describe_names_the_node_and_its_model(listening_consortium):
    shared_consortium = listening_consortium
    with shared_consortium.channel("vietnam") as channel:
        described = pb_grpc.SovereignNodeServiceStub(channel).Describe(pb.DescribeRequest())
    assert (described.node_id, described.jurisdiction) == ("vietnam", "Vietnam")
    assert (
        described.model.architecture,
        described.model.vocab_size,
        described.model.hidden_size,
    ) == ("tiny-causal", 256, 32)
    assert described.quality_score == 0.90
    assert described.token_count > 0


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapestry", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def _fits(output: str) -> None:
    wide = [line for line in output.splitlines() if len(line) > WIDTH]
    assert wide == [], f"lines past {WIDTH} columns:\n" + "\n".join(wide)


@pytest.mark.slow
def test_cli_triggers_a_round_and_lists_rounds_and_artifacts(shared_consortium):
    address = shared_consortium.coordinator_address
    ran = _cli("round", "run", "--coordinator", address, "--json", env=shared_consortium.cli_env())
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["accepted_nodes"] == ["vietnam", "switzerland", "india"]
    assert result["previous_base_sha256"] != result["shared_base_sha256"]
    assert set(result["contribution_weights"]) == set(result["accepted_nodes"])
    assert result["policy"] == {
        "quality_floor": 0.75,
        "max_node_weight": 0.5,
        "weighting": "CONTRIBUTION_WEIGHTING_QUALITY",
        "max_quality": 1.0,
        "max_delta_norm_ratio": 10.0,
        "strategy": "INTEGRATION_STRATEGY_FEDAVG",
    }
    assert result["started_at"] <= result["finished_at"]
    assert result["started_at"].endswith("Z")
    # Counts and sizes are JSON numbers, not the strings proto JSON makes of 64-bit ints.
    for contribution in result["contributions"]:
        assert isinstance(contribution["token_count"], int) and contribution["token_count"] > 0
    assert [a["node_id"] for a in result["artifacts"]] == result["accepted_nodes"]
    for artifact in result["artifacts"]:
        assert isinstance(artifact["model_state_bytes"], int)
        assert "stored_at" not in artifact

    listed = _cli(
        "rounds",
        "--coordinator",
        address,
        "--json",
        "--page-size",
        "1",
        env=shared_consortium.cli_env(),
    )
    assert listed.returncode == 0, listed.stderr
    rounds = json.loads(listed.stdout)
    assert [r["round_num"] for r in rounds] == list(range(1, result["round_num"] + 1))
    assert (
        rounds[-1]["contributions"][0]["token_count"] == result["contributions"][0]["token_count"]
    )

    as_json = _cli(
        "artifacts",
        "--coordinator",
        address,
        "--json",
        "--page-size",
        "2",
        env=shared_consortium.cli_env(),
    )
    assert as_json.returncode == 0, as_json.stderr
    artifacts = json.loads(as_json.stdout)
    assert [a["node_id"] for a in artifacts] == ["vietnam", "switzerland", "india"]
    assert all(isinstance(a["model_state_bytes"], int) for a in artifacts)
    assert all("stored_at" not in a for a in artifacts)

    table = _cli("artifacts", "--coordinator", address, env=shared_consortium.cli_env())
    assert table.returncode == 0, table.stderr
    assert "continued" in table.stdout and "pretraining" in table.stdout
    assert artifacts[0]["model_state_sha256"][:12] in table.stdout
    assert artifacts[0]["model_state_sha256"][:13] not in table.stdout
    assert "stored" not in table.stdout and "data-dir" not in table.stdout
    _fits(table.stdout)

    rounds_table = _cli("rounds", "--coordinator", address, env=shared_consortium.cli_env())
    assert rounds_table.returncode == 0, rounds_table.stderr
    assert result["shared_base_sha256"][:12] in rounds_table.stdout
    _fits(rounds_table.stdout)

    healthy = _cli("health", "--address", address, env=shared_consortium.cli_env())
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING")


@pytest.mark.slow
def test_cli_round_run_prints_progress_and_a_table_that_fit_80_columns(shared_consortium):
    ran = _cli(
        "round",
        "run",
        "--coordinator",
        shared_consortium.coordinator_address,
        env=shared_consortium.cli_env(),
    )
    assert ran.returncode == 0, ran.stderr
    for node_id in ("vietnam", "switzerland", "india"):
        assert f"· {node_id}: started" in ran.stdout
        assert f"· {node_id}: contributed" in ran.stdout
    flat = " ".join(ran.stdout.split())  # the table's wrapping undone
    assert "policy: quality weighting, floor 0.75, cap 0.5" in flat
    _fits(ran.stdout)


@pytest.mark.slow
def test_a_node_serves_its_artifact_by_round_or_latest(listening_consortium):
    shared_consortium = listening_consortium  # a node that serves, to be reached
    with shared_consortium.client() as client:
        committed = client.run_round()
    with shared_consortium.channel("india") as channel:
        stub = pb_grpc.SovereignNodeServiceStub(channel)
        latest = stub.GetArtifact(pb.GetArtifactRequest(latest=True)).artifact
        by_round = stub.GetArtifact(pb.GetArtifactRequest(round_num=committed.round_num))
        described = stub.Describe(pb.DescribeRequest())
        refused = {}
        for name, request in {
            "nothing": pb.GetArtifactRequest(),
            "zero": pb.GetArtifactRequest(round_num=0),
        }.items():
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetArtifact(request)
            refused[name] = caught.value

    assert latest.round_num == committed.round_num == described.latest_round
    assert latest.node_id == "india"
    assert by_round.artifact == latest
    assert latest == {a.node_id: a for a in committed.artifacts}["india"]
    assert refused["nothing"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused["nothing"].details() == (
        "ValueError: select a round: set round_num (>= 1) or latest=true"
    )
    assert refused["zero"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused["zero"].details().startswith("ValueError: round_num must be >= 1")


def test_cli_reports_an_unreachable_coordinator_clearly():
    ran = _cli("rounds", "--coordinator", "127.0.0.1:1", "--insecure")
    assert ran.returncode == 1
    assert "UNAVAILABLE" in ran.stderr
    assert "Traceback" not in ran.stderr
