"""Health, reflection, Describe and the CLI against real servers."""

from __future__ import annotations

import json
import subprocess
import sys

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.wire.grpc_plumbing import check_health, insecure_channel


def test_every_server_is_healthy_and_reflects_its_services(shared_consortium):
    expected = {
        "coordinator": "tapestry.consortium.v1.Coordinator",
        "vietnam": "tapestry.consortium.v1.SovereignNode",
    }
    for name, service in expected.items():
        address = shared_consortium.processes[name].address
        assert check_health(address) == "SERVING"
        assert check_health(address, service) == "SERVING"
        with insecure_channel(address) as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {service, "grpc.health.v1.Health"} <= services


def test_describe_names_the_node_and_its_model(shared_consortium):
    with insecure_channel(shared_consortium.processes["vietnam"].address) as channel:
        described = pb_grpc.SovereignNodeStub(channel).Describe(pb.DescribeRequest())
    assert (described.node_id, described.jurisdiction) == ("vietnam", "Vietnam")
    assert (
        described.model.architecture,
        described.model.vocab_size,
        described.model.hidden_size,
    ) == ("tiny-causal", 256, 32)
    assert described.quality_score == 0.90
    assert described.token_count > 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapestry", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_cli_triggers_a_round_and_lists_rounds_and_artifacts(shared_consortium):
    address = shared_consortium.coordinator_address
    ran = _cli("round", "run", "--coordinator", address, "--json")
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["accepted_nodes"] == ["vietnam", "switzerland", "india"]
    assert result["previous_base_sha256"] != result["shared_base_sha256"]
    assert set(result["contribution_weights"]) == set(result["accepted_nodes"])

    listed = _cli("rounds", "--coordinator", address, "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[-1]["round_num"] == result["round_num"]

    artifacts = _cli("artifacts", "--coordinator", address)
    assert artifacts.returncode == 0, artifacts.stderr
    assert "continued_pretraining" in artifacts.stdout

    healthy = _cli("health", "--address", address)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING")


def test_cli_reports_an_unreachable_coordinator_clearly():
    ran = _cli("rounds", "--coordinator", "127.0.0.1:1")
    assert ran.returncode == 1
    assert "UNAVAILABLE" in ran.stderr
    assert "Traceback" not in ran.stderr
