"""Over the services: an operator rolls the base back to an earlier round's, recorded as a new
round; GetBase serves that base bit for bit, a restart resumes there, and the CLI says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.demo.launcher import LocalConsortium
from tapestry.training.consortium import state_digest

from .conftest import POLICY
from .fake_nodes import BlockingNode, FakeNode, serve


@contextmanager
def consortium_after_two_rounds(
    root: Path,
) -> Iterator[tuple[LocalConsortium, list[pb.ConsortiumRoundResult]]]:
    """Two fake members (each adds 0.01 to every weight), so every round moves the base."""
    with (
        serve([FakeNode("alpha"), FakeNode("beta")]) as members,
        LocalConsortium(root, [], policy=POLICY, extra_members=members, tls=False) as consortium,
    ):
        with consortium.client() as client:
            rounds = [client.run_round(), client.run_round()]
        assert rounds[0].shared_base_sha256 != rounds[1].shared_base_sha256
        yield consortium, rounds


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalConsortium]:
    """One consortium after two rounds for the refused rollbacks, which must leave it as
    they found it (each of them checks)."""
    with consortium_after_two_rounds(tmp_path_factory.mktemp("refusing")) as (consortium, _):
        yield consortium


def test_a_rollback_is_recorded_as_a_new_round_and_the_earlier_base_is_served(tmp_path):
    with consortium_after_two_rounds(tmp_path) as (consortium, (first, second)):
        with consortium.client() as client:
            result = client.roll_back_base(1)
            round_num, base = client.get_base()
            listed = client.list_rounds()
        journal = sorted(p.name for p in (consortium.coordinator_data_dir / "rounds").iterdir())

    assert (result.round_num, result.rolled_back_to) == (3, 1)
    assert result.previous_base_sha256 == second.shared_base_sha256
    assert result.shared_base_sha256 == first.shared_base_sha256
    assert (list(result.accepted_nodes), dict(result.failed_nodes)) == ([], {})
    assert round_num == 3
    assert state_digest(base) == first.shared_base_sha256
    assert [(r.round_num, r.HasField("rolled_back_to")) for r in listed] == [
        (1, False),
        (2, False),
        (3, True),
    ]
    assert listed[2] == result
    assert journal == ["round-000001.json", "round-000002.json", "round-000003.json"]


def test_a_restart_resumes_at_the_rollback_and_the_next_round_starts_from_it(tmp_path):
    with consortium_after_two_rounds(tmp_path) as (consortium, (first, _)):
        with consortium.client() as client:
            client.roll_back_base(1)
        consortium.restart_coordinator()
        with consortium.client() as client:
            resumed_at, base = client.get_base()
            fourth = client.run_round()

    assert resumed_at == 3
    assert state_digest(base) == first.shared_base_sha256
    assert fourth.round_num == 4
    assert fourth.previous_base_sha256 == first.shared_base_sha256
    assert sorted(fourth.accepted_nodes) == ["alpha", "beta"]


def test_a_rollback_to_the_initial_base_restores_round_zeros_base(tmp_path):
    with consortium_after_two_rounds(tmp_path) as (consortium, (first, _)):
        client = consortium.client()
        with client:
            result = client.roll_back_base(0)
            _, base = client.get_base()

    assert (result.round_num, result.HasField("rolled_back_to"), result.rolled_back_to) == (
        3,
        True,
        0,
    )
    assert result.shared_base_sha256 == first.previous_base_sha256 == state_digest(base)


def test_a_round_never_committed_is_not_found(refusing):
    with refusing.client() as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.roll_back_base(7)
        listed = client.list_rounds()

    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == "NotFound: round 7 not found; committed rounds: 0..2"
    assert len(listed) == 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.parametrize("to_round", [2**32 + 2, 2**63, 2**64 - 1])
def test_a_round_past_32_bits_is_not_taken_modulo_2_to_the_32(refusing, to_round):
    # Sent as raw bytes, as any client may: field 1 (to_round) as a varint. When round
    # numbers were uint32, 2**32 + 2 rolled back to round 2 and 2**63 to round 0.
    method = "/tapestry.consortium.v1.CoordinatorService/RollBackBase"
    with grpc.insecure_channel(refusing.coordinator_address) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=lambda raw: raw,
            response_deserializer=pb.RollBackBaseResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\x08" + _varint(to_round), timeout=30)
    with refusing.client() as client:
        listed = client.list_rounds()

    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == (
        f"NotFound: round {to_round} not found; committed rounds: 0..2"
    )
    assert len(listed) == 2


def test_a_damaged_base_is_not_restored(tmp_path):
    with consortium_after_two_rounds(tmp_path) as (consortium, _):
        damaged = consortium.coordinator_data_dir / "base" / "round-000001.safetensors"
        damaged.write_bytes(damaged.read_bytes()[:-8])
        with consortium.client() as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.roll_back_base(1)
            round_num, _ = client.get_base()

    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details().startswith(
        f"StoreError: the base of round 1 ({damaged}) is missing or does not match its "
        "recorded digest "
    )
    assert refused.value.details().endswith("; it cannot be restored")
    assert round_num == 2


def test_a_rollback_while_a_round_runs_is_refused(tmp_path):
    blocking = BlockingNode("slow")
    with (
        serve([FakeNode("alpha"), blocking]) as members,
        LocalConsortium(
            tmp_path, [], policy=POLICY, extra_members=members, tls=False
        ) as consortium,
        consortium.client() as client,
    ):
        running = threading.Thread(target=client.run_round)
        running.start()
        try:
            assert blocking.started.wait(timeout=60), "the round never reached the member"
            with pytest.raises(grpc.RpcError) as refused:
                client.roll_back_base(0)
        finally:
            blocking.release.set()
            running.join()
        listed = client.list_rounds()

    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == (
        "Busy: round 1 is running; wait for its result (tapestry rounds) and roll back after it"
    )
    assert [(r.round_num, r.HasField("rolled_back_to")) for r in listed] == [(1, False)]


def _tapestry(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapestry", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_cli_base_rollback_prints_one_line(tmp_path):
    with consortium_after_two_rounds(tmp_path) as (consortium, (first, second)):
        address = consortium.coordinator_address
        ran = _tapestry(
            "base", "rollback", "--to", "1", "--coordinator", address, env=consortium.cli_env()
        )
        table = _tapestry("rounds", "--coordinator", address, env=consortium.cli_env())

    assert (ran.returncode, ran.stderr) == (0, "")
    assert ran.stdout == (
        f"Round 3 rolled the base back to round 1's: base {second.shared_base_sha256[:12]} "
        f"-> {first.shared_base_sha256[:12]}\n"
    )
    assert table.returncode == 0
    assert "rollback to 1" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80


def test_cli_base_rollback_json_is_the_recorded_round(tmp_path):
    with consortium_after_two_rounds(tmp_path) as (consortium, (first, _)):
        address = consortium.coordinator_address
        ran = _tapestry(
            "base",
            "rollback",
            "--to",
            "0",
            "--coordinator",
            address,
            "--json",
            env=consortium.cli_env(),
        )

    assert ran.returncode == 0
    shown = json.loads(ran.stdout)
    assert (shown["round_num"], shown["rolled_back_to"]) == (3, 0)
    assert shown["shared_base_sha256"] == first.previous_base_sha256


def test_cli_base_rollback_to_a_missing_round_says_so(refusing):
    address = refusing.coordinator_address
    ran = _tapestry(
        "base", "rollback", "--to", "9", "--coordinator", address, env=refusing.cli_env()
    )

    assert (ran.returncode, ran.stdout) == (1, "")
    assert ran.stderr == (
        f"Error: the coordinator at {address} refused the call (NOT_FOUND: NotFound: round 9 "
        "not found; committed rounds: 0..2)\n"
    )
