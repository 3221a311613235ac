"""The ledger of a real coordinator serving mutual TLS: every round the operator triggers,
and its rollback, is recorded with the operator's identity, chained and signed with the
coordinator's key, and `tapestry ledger verify` passes it, then fails it once a base file
changes."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.client import CoordinatorClient
from tapestry.coordinator.journal import CoordinatorStore, record_digest
from tapestry.node.receipts import Receipts
from tapestry.pki.statements import SignatureCheck, signed_bytes
from tapestry.wire.codec import message_from_json
from tests.integration.conftest import round_run


def _tapestry(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapestry", *args], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, env={**os.environ, **env},
    )  # fmt: skip


def test_a_tls_coordinators_rounds_are_signed_chained_and_verify(consortium_factory) -> None:
    consortium = consortium_factory()
    operator = f"spiffe://{consortium.consortium_id}/operator/operator"
    ran = round_run(consortium, "--rounds", "2")
    assert ran.returncode == 0, ran.stderr
    assert f"triggered by {operator}" in ran.stdout
    env = consortium.cli_env()
    rolled = _tapestry(
        "base", "rollback", "--to", "1", "--coordinator", consortium.coordinator_address, env=env
    )
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.rstrip().endswith(f", by {operator}")

    data_dir = str(consortium.coordinator_data_dir)
    records = CoordinatorStore(consortium.coordinator_data_dir, read_only=True).records()
    assert [r.result.round_num for r in records] == [1, 2, 3]
    assert [r.result.operator for r in records] == [operator] * 3
    assert all(r.HasField("signature") for r in records)
    # Each member signed the delta it sent and its evaluations; verify checks those too.
    for record in records[:2]:
        fetched = [c for c in record.result.contributions if c.weight_delta_sha256]
        assert fetched and all(c.HasField("signature") for c in fetched)
        # Each member's certificate kept once in the record, not in each signature.
        assert sorted(record.result.member_certificates) == sorted(c.node_id for c in fetched)
        assert not any(c.signature.certificate for c in fetched)
        for attempt in record.result.validation.attempts:
            assert all(e.HasField("signature") for e in attempt.evaluations)
    # --ca comes from the environment (TAPESTRY_CA), as for every other command
    verified = _tapestry("ledger", "verify", "--data-dir", data_dir,
                         "--crl", str(consortium.certs.crl), env=env)  # fmt: skip
    assert (verified.returncode, verified.stderr) == (0, "")
    assert verified.stdout == (
        f"ledger verified: 3 round(s), head {record_digest(records[-1])}, signed by "
        f"spiffe://{consortium.consortium_id}/coordinator\n"
    )

    base = consortium.coordinator_data_dir / "base" / "round-000001.safetensors"
    data = bytearray(base.read_bytes())
    data[-1] ^= 0x80
    base.write_bytes(bytes(data))
    failed = _tapestry("ledger", "verify", "--data-dir", data_dir, env=env)
    assert failed.returncode == 1
    lines = failed.stdout.splitlines()
    assert lines[0].startswith("round 1: the base file round-000001.safetensors has digest ")
    assert lines[0].endswith(f"the record says {records[0].result.shared_base_sha256[:12]}")
    # round 3 restored round 1's base: its own file is intact, and its record still agrees
    assert len(lines) == 1, lines


def test_ledger_verify_over_the_coordinators_rpcs_and_members_receipts(
    consortium_factory,
) -> None:
    """The same check over ListRoundRecords and GetBase: as the operator and as a member
    node's certificate it passes, saying the momentum files were not checked; a caller
    without a certificate is refused. After two rounds, every member holds round 1's record
    as its receipt (round 2's start carried it), signed by the coordinator, as the
    coordinator's journal holds it."""
    consortium = consortium_factory()
    ran = round_run(consortium, "--rounds", "2")
    assert ran.returncode == 0, ran.stderr
    records = CoordinatorStore(consortium.coordinator_data_dir, read_only=True).records()
    for node_id in ("vietnam", "switzerland", "india"):
        kept = Receipts(consortium.node_data_dir(node_id), None).path(1)
        receipt = message_from_json(kept.read_text(encoding="utf-8"), pb.RoundRecord)
        assert receipt == records[0] and receipt.HasField("signature")
        check = SignatureCheck(consortium.certs.ca_cert, consortium.certs.crl)
        assert check.signer(receipt.signature, signed_bytes(receipt)).role == "coordinator"
        assert not Receipts(consortium.node_data_dir(node_id), None).path(2).exists()
    address = consortium.coordinator_address
    for env in (consortium.cli_env(), consortium.cli_env("node", "india")):
        verified = _tapestry("ledger", "verify", "--coordinator", address, env=env)
        assert (verified.returncode, verified.stderr) == (0, ""), verified.stdout
        assert verified.stdout == (
            f"ledger verified: 2 round(s), head {record_digest(records[-1])}, signed by "
            f"spiffe://{consortium.consortium_id}/coordinator (over the RPCs: momentum files "
            "not served, not checked)\n"
        )
    # TLS with the consortium's CA but no certificate of one's own: the handshake is refused
    ca = consortium.certs.ca_cert.read_bytes()
    stranger = CoordinatorClient(address, grpc.ssl_channel_credentials(root_certificates=ca))
    with stranger, pytest.raises(grpc.RpcError) as refused:
        list(stranger.iter_round_records())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # and the command will not call without one
    no_cert = {
        "TAPESTRY_CA": str(consortium.certs.ca_cert),
        "TAPESTRY_CERT": "",
        "TAPESTRY_KEY": "",
    }
    refused_cli = _tapestry("ledger", "verify", "--coordinator", address, env=no_cert)
    assert refused_cli.returncode == 2
    assert "--coordinator needs --cert and --key" in refused_cli.stderr
