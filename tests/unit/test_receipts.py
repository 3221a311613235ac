"""A member's receipts (tapestry.node.receipts): the coordinator's signed records a cycle's
start carries are kept once their signature holds; a bad one is dropped, a kept one is never
replaced, and a node without a CA keeps none."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.base_proofs import receipts
from tapestry.limits import MAX_RECEIPTS_BYTES
from tapestry.node.receipts import Receipts
from tapestry.pki.authority import init_consortium
from tapestry.pki.layout import Layout
from tapestry.pki.signing import Signer
from tapestry.pki.statements import SignatureCheck, signed_bytes
from tapestry.wire.codec import message_from_json, signature_to_proto


@pytest.fixture
def pki(tmp_path: Path) -> Layout:
    return init_consortium(
        tmp_path / "pki", "acme", coordinator_hosts=["h"], nodes=[("india", "h")]
    )


def _signed(pki: Layout, round_num: int, by: Path, weight: float = 0.5) -> pb.RoundRecord:
    record = pb.RoundRecord(
        result=pb.ConsortiumRoundResult(round_num=round_num, contribution_weights={"a": weight})
    )
    signer = Signer.from_files(by / "cert.pem", by / "key.pem", pki.ca_cert)
    record.signature.CopyFrom(signature_to_proto(signer.sign(signed_bytes(record))))
    return record


def test_valid_receipts_are_kept_and_bad_ones_dropped(
    pki: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receipts = Receipts(tmp_path / "node", SignatureCheck(pki.ca_cert))
    good = _signed(pki, 1, pki.coordinator)
    by_a_node = _signed(pki, 2, pki.holder("node", "india"))
    changed = _signed(pki, 3, pki.coordinator)
    changed.result.contribution_weights["a"] = 0.9  # after signing
    unsigned = pb.RoundRecord(result=pb.ConsortiumRoundResult(round_num=4))
    with caplog.at_level(logging.WARNING):
        assert receipts.keep([good, by_a_node, changed, unsigned]) == [1]
    kept = message_from_json(receipts.path(1).read_text(encoding="utf-8"), pb.RoundRecord)
    assert kept == good
    assert sorted(p.name for p in receipts.folder.iterdir()) == ["round-000001.json"]
    assert "round 2 not kept: signed by spiffe://acme/node/india" in caplog.text
    assert "round 4 not kept: not signed" in caplog.text


def test_a_kept_receipt_is_never_replaced(
    pki: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receipts = Receipts(tmp_path / "node", SignatureCheck(pki.ca_cert))
    first = _signed(pki, 1, pki.coordinator)
    assert receipts.keep([first]) == [1]
    assert receipts.keep([first]) == []  # the same again: nothing to do
    rewritten = _signed(pki, 1, pki.coordinator, weight=0.9)
    with caplog.at_level(logging.WARNING):
        assert receipts.keep([rewritten]) == []
    assert "differs from the receipt kept" in caplog.text
    kept = message_from_json(receipts.path(1).read_text(encoding="utf-8"), pb.RoundRecord)
    assert kept == first


def test_a_node_without_a_ca_keeps_none(pki: Layout, tmp_path: Path) -> None:
    receipts = Receipts(tmp_path / "node", None)
    assert receipts.keep([_signed(pki, 1, pki.coordinator)]) == []
    assert not receipts.folder.exists()


def test_the_coordinator_sends_the_records_since_the_nodes_round_bounded() -> None:
    records = [pb.RoundRecord(result=pb.ConsortiumRoundResult(round_num=n)) for n in range(1, 41)]
    assert [r.result.round_num for r in receipts(records, 38)] == [38, 39, 40]
    assert [r.result.round_num for r in receipts(records, 0)] == list(range(9, 41))  # newest 32
    big = pb.RoundRecord(result=pb.ConsortiumRoundResult(round_num=41, aborted_reason="x" * 2**20))
    sent = receipts([*records, big, big, big], 39)
    assert sum(r.ByteSize() for r in sent) <= MAX_RECEIPTS_BYTES and sent[-1] is big
