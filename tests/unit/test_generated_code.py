"""The generated protobuf code on disk is exactly what scripts/gen-protos makes from protos/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "services" / "tapestry" / "consortium" / "v1"
FILES = ["consortium_pb2.py", "consortium_pb2.pyi", "consortium_pb2_grpc.py"]


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


@pytest.mark.parametrize("name", FILES)
def test_generated_file_matches_the_proto(regenerated: Path, name: str) -> None:
    fresh = regenerated / name
    on_disk = GENERATED / name
    assert fresh.is_file(), f"scripts/gen-protos did not produce {name}"
    assert on_disk.is_file(), f"{on_disk.relative_to(ROOT)} is missing: run scripts/gen-protos"
    assert on_disk.read_bytes() == fresh.read_bytes(), (
        f"{on_disk.relative_to(ROOT)} differs from what protos/ generates: run scripts/gen-protos"
    )


def test_generation_makes_nothing_else(regenerated: Path) -> None:
    assert sorted(p.name for p in regenerated.iterdir()) == FILES


def test_package_is_tapestry_consortium_v1() -> None:
    assert pb.DESCRIPTOR.package == "tapestry.consortium.v1"
    assert pb.DESCRIPTOR.name == "tapestry/consortium/v1/consortium.proto"


@pytest.mark.parametrize(
    ("service", "methods"),
    [
        ("Coordinator", ["RunRound", "GetRound", "ListRounds", "GetBase", "ListArtifacts"]),
        ("SovereignNode", ["Describe", "RunSovereignCycle", "GetArtifact"]),
    ],
)
def test_services_and_their_rpcs(service: str, methods: list[str]) -> None:
    assert service in pb.DESCRIPTOR.services_by_name, sorted(pb.DESCRIPTOR.services_by_name)
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    assert descriptor.full_name == f"tapestry.consortium.v1.{service}"
    assert sorted(descriptor.methods_by_name) == sorted(methods)


def test_rpc_shapes() -> None:
    def shape(service: str, method: str) -> tuple[str, str, bool, bool]:
        m = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method]
        return m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming

    assert shape("Coordinator", "RunRound") == ("RunRoundRequest", "RoundEvent", False, True)
    assert shape("Coordinator", "GetRound") == (
        "GetRoundRequest",
        "ConsortiumRoundResult",
        False,
        False,
    )
    assert shape("Coordinator", "ListRounds") == (
        "ListRoundsRequest",
        "ListRoundsResponse",
        False,
        False,
    )
    assert shape("Coordinator", "GetBase") == ("GetBaseRequest", "BaseChunk", False, True)
    assert shape("Coordinator", "ListArtifacts") == (
        "ListArtifactsRequest",
        "ListArtifactsResponse",
        False,
        False,
    )
    assert shape("SovereignNode", "Describe") == (
        "DescribeRequest",
        "NodeDescription",
        False,
        False,
    )
    assert shape("SovereignNode", "RunSovereignCycle") == (
        "RunSovereignCycleRequest",
        "RunSovereignCycleResponse",
        True,
        True,
    )
    assert shape("SovereignNode", "GetArtifact") == (
        "GetArtifactRequest",
        "SovereignModelArtifact",
        False,
        False,
    )
