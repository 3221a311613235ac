"""The contract as generated: scripts/gen-protos makes typed code from protos/, and the
generated descriptors say what the v1 contract promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
FILES = [
    "consortium_pb2.py",
    "consortium_pb2.pyi",
    "consortium_pb2_grpc.py",
    "consortium_pb2_grpc.pyi",
]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen-protos")
    done = subprocess.run(
        [str(ROOT / "scripts" / "gen-protos"), str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"scripts/gen-protos failed:\n{done.stdout}{done.stderr}"
    return out / "tapestry" / "consortium" / "v1"


def test_generation_makes_the_code_and_typed_stubs_for_both(regenerated: Path) -> None:
    """Run into an empty folder: the step works on its own and makes typed stubs for the
    messages and the gRPC stubs alike (what `mypy --strict` needs), nothing else."""
    assert sorted(p.name for p in regenerated.iterdir()) == sorted(FILES)
    stub = (regenerated / "consortium_pb2_grpc.pyi").read_text(encoding="utf-8")
    assert "class CoordinatorServiceStub" in stub
    assert "class SovereignNodeServiceServicer" in stub


def test_package_is_tapestry_consortium_v1() -> None:
    assert pb.DESCRIPTOR.package == "tapestry.consortium.v1"
    assert pb.DESCRIPTOR.name == "tapestry/consortium/v1/consortium.proto"


def test_the_stored_round_record_is_served_by_the_api() -> None:
    """One file: the coordinator serves its journal's records (ListRoundRecords) and a
    member's receipts (CycleStart.receipts) as they are stored."""
    assert pb.RoundRecord.DESCRIPTOR.full_name == "tapestry.consortium.v1.RoundRecord"
    result = pb.RoundRecord.DESCRIPTOR.fields_by_name["result"]
    assert result.message_type is pb.ConsortiumRoundResult.DESCRIPTOR


@pytest.mark.parametrize(
    ("service", "methods"),
    [
        (
            "CoordinatorService",
            [
                "RunRound",
                "GetRound",
                "ListRounds",
                "GetBase",
                "ListArtifacts",
                "RollBackBase",
                "OpenSession",
                "ListMembers",
                "ListRoundRecords",
            ],
        ),
        ("SovereignNodeService", ["Describe", "RunSovereignCycle", "GetArtifact"]),
    ],
)
def test_services_and_their_rpcs(service: str, methods: list[str]) -> None:
    assert sorted(pb.DESCRIPTOR.services_by_name) == ["CoordinatorService", "SovereignNodeService"]
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    assert descriptor.full_name == f"tapestry.consortium.v1.{service}"
    assert sorted(descriptor.methods_by_name) == sorted(methods)


# (service, method) -> (request, response, client streaming, server streaming)
SHAPES = {
    ("CoordinatorService", "RunRound"): ("RunRoundRequest", "RunRoundResponse", False, True),
    ("CoordinatorService", "GetRound"): ("GetRoundRequest", "GetRoundResponse", False, False),
    ("CoordinatorService", "ListRounds"): ("ListRoundsRequest", "ListRoundsResponse", False, False),
    ("CoordinatorService", "GetBase"): ("GetBaseRequest", "GetBaseResponse", False, True),
    ("CoordinatorService", "ListArtifacts"): (
        "ListArtifactsRequest",
        "ListArtifactsResponse",
        False,
        False,
    ),
    ("SovereignNodeService", "Describe"): ("DescribeRequest", "DescribeResponse", False, False),
    ("SovereignNodeService", "RunSovereignCycle"): (
        "RunSovereignCycleRequest",
        "RunSovereignCycleResponse",
        True,
        True,
    ),
    ("SovereignNodeService", "GetArtifact"): (
        "GetArtifactRequest",
        "GetArtifactResponse",
        False,
        False,
    ),
}


@pytest.mark.parametrize(("service", "method"), sorted(SHAPES))
def test_rpc_shapes(service: str, method: str) -> None:
    m = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    shape = (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
    assert shape == SHAPES[service, method]


@pytest.mark.parametrize("listing", ["ListRounds", "ListArtifacts"])
def test_list_methods_are_paginated(listing: str) -> None:
    request = getattr(pb, f"{listing}Request").DESCRIPTOR.fields_by_name
    response = getattr(pb, f"{listing}Response").DESCRIPTOR.fields_by_name
    assert request["page_size"].type == request["page_size"].TYPE_INT32
    assert request["page_token"].type == request["page_token"].TYPE_STRING
    assert response["next_page_token"].type == response["next_page_token"].TYPE_STRING


def test_round_times_are_timestamps_and_latest_is_explicit() -> None:
    fields = pb.ConsortiumRoundResult.DESCRIPTOR.fields_by_name
    for name in ("started_at", "finished_at"):
        assert fields[name].message_type.full_name == "google.protobuf.Timestamp"
    for request in (pb.GetRoundRequest, pb.GetArtifactRequest):
        selector = request.DESCRIPTOR.oneofs_by_name["selector"]
        assert [f.name for f in selector.fields] == ["round_num", "latest"]


def test_node_local_paths_are_not_on_the_wire() -> None:
    assert "stored_at" not in pb.SovereignModelArtifact.DESCRIPTOR.fields_by_name


def test_buf_lint_passes() -> None:
    """STANDARD rules plus a leading comment on everything (protos/buf.yaml)."""
    buf = Path(sys.executable).parent / "buf"
    done = subprocess.run(
        [str(buf), "lint"],
        cwd=ROOT / "protos",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"buf lint:\n{done.stdout}{done.stderr}"
