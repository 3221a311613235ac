"""A node trains only on a base the members accepted: each member signs its evaluations with
its own key, the coordinator counts only evaluations signed by their member, and a node
refuses a base it did not train from unless signed evaluations of at least two members lead
to it; so a base made with the coordinator's key alone (or signed by it in the members'
names, or by a revoked member) trains nowhere.

The nodes are real gRPC servers on 127.0.0.1 in this process, each with its certificate
from a consortium CA made for the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.base_proofs import base_proofs
from tapestry.node.artifacts import ArtifactStore
from tapestry.node.base_trust import TRUSTED_BASES, BaseTrust
from tapestry.node.guard import CycleRefused
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.pki.authority import init_consortium, revoke_member
from tapestry.pki.layout import Layout
from tapestry.pki.signing import Signer
from tapestry.pki.statements import SignatureCheck, sign_evaluation
from tapestry.training.consortium import ConsortiumCoordinator, ContributionPolicy, state_digest
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy
from tapestry.training.consortium.round.result import ConsortiumRoundResult
from tapestry.wire.codec import round_result_to_proto

from .node_servers import Served, served_nodes
from .test_validation_over_grpc import CHUNK_BYTES, CONSORTIUM, MEMBERS, SEED, SPEC, _node


@pytest.fixture
def certs(tmp_path: Path) -> Layout:
    return init_consortium(
        tmp_path / "certs",
        CONSORTIUM,
        coordinator_hosts=["127.0.0.1"],
        nodes=[(node_id, "127.0.0.1") for node_id in MEMBERS],
    )


def _signer(certs: Layout, role: str, name: str = "") -> Signer:
    folder = certs.holder(role, name)  # type: ignore[arg-type]
    return Signer.from_files(folder / "cert.pem", folder / "key.pem", certs.ca_cert)


class Consortium:
    """Three signing, checking members behind real servers, and the coordinator's core with
    its journal's records in memory (what the services keep on disk)."""

    def __init__(self, root: Path, certs: Layout) -> None:
        self.root = root
        self.check = SignatureCheck(certs.ca_cert, certs.crl)
        self.servicers = {
            node_id: SovereignNodeServicer(
                _node(node_id, corpus),
                SPEC,
                ArtifactStore(root / node_id),
                CONSORTIUM,
                chunk_bytes=CHUNK_BYTES,
                signer=_signer(certs, "node", node_id),
                trust=BaseTrust(node_id, CONSORTIUM, root / node_id, self.check, 2, 0.01),
            )
            for node_id, corpus in MEMBERS.items()
        }
        self.coordinator = ConsortiumCoordinator(
            SPEC.build(SEED),
            ContributionPolicy(),
            min_nodes=2,
            copy_states=False,
            acceptance=AcceptancePolicy(),
        )
        self.records: list[pb.RoundRecord] = []
        self.proofs = lambda since: base_proofs(self.records, since)

    def commit(self, result: ConsortiumRoundResult) -> None:
        self.records.append(pb.RoundRecord(result=round_result_to_proto(result)))

    def run(self, served: Served) -> ConsortiumRoundResult:
        for proxy in served.proxies:
            proxy.signatures = self.check
            proxy._base_proofs = lambda since: self.proofs(since)
        return self.coordinator.run_round(served.proxies, commit=self.commit)


@pytest.fixture
def consortium(tmp_path: Path, certs: Layout) -> Iterator[tuple[Consortium, Served]]:
    members = Consortium(tmp_path, certs)
    with served_nodes(
        tmp_path, members.servicers, spec=SPEC, consortium_id=CONSORTIUM, chunk_bytes=CHUNK_BYTES
    ) as served:
        yield members, served


def _crafted(members: Consortium) -> dict[str, torch.Tensor]:
    """A base the members never saw: the coordinator's, pushed off by 0.5."""
    return {k: v + 0.5 for k, v in members.coordinator.shared_base_state.items()}


def test_members_sign_their_evaluations_and_train_on_the_bases_they_accepted(
    consortium: tuple[Consortium, Served],
) -> None:
    members, served = consortium
    first = members.run(served)
    second = members.run(served)

    validation = first.validation
    assert validation is not None and validation.scale is not None
    for evaluation in validation.attempts[-1].evaluations:
        assert evaluation.signature, evaluation.node_id
    # Each delta came signed over its ContributionStatement, checked on arrival.
    for proxy in served.proxies:
        assert 2 in proxy.contribution_signatures, proxy.node_id
    # The record's proof of round 1: its step, signed by each member that evaluated it.
    (proof,) = base_proofs(members.records[:1], 1)
    assert (proof.from_sha256, proof.to_sha256) == (
        first.previous_base_sha256,
        first.shared_base_sha256,
    )
    for evaluation in proof.evaluations:
        who = members.check.signer(
            evaluation.signature,
            _statement(proof, evaluation),
        )
        assert (who.role, who.name) == ("node", evaluation.node_id)
    # Round 2 trained everywhere from round 1's base, which each member now trusts.
    assert second.accepted_nodes == list(MEMBERS)
    assert second.previous_base_sha256 == first.shared_base_sha256
    for node_id in MEMBERS:
        trusted = (members.root / node_id / TRUSTED_BASES).read_text()
        assert first.shared_base_sha256 in trusted


def _statement(proof: pb.BaseProof, evaluation: pb.MemberEvaluation) -> bytes:
    from tapestry.pki.statements import evaluation_statement

    return evaluation_statement(CONSORTIUM, proof.round_num, proof.from_sha256, evaluation)


def test_a_base_made_with_the_coordinators_key_alone_trains_nowhere(
    consortium: tuple[Consortium, Served], certs: Layout
) -> None:
    members, served = consortium
    trusted = members.run(served).shared_base_sha256  # each member trains from it next
    crafted = _crafted(members)
    digest = state_digest(crafted)
    members.coordinator.load_base_state(crafted, 1)

    # 1. Sent with the records' honest proofs, none of which leads to it.
    refused = members.run(served)
    assert sorted(refused.failed_nodes) == sorted(MEMBERS)
    for reason in refused.failed_nodes.values():
        assert f"refuses base '{digest}'" in reason, reason
    assert refused.aborted_reason and refused.shared_base_sha256 == digest  # nothing moved

    # 2. With a proof the coordinator signed in the members' names.
    coordinator = _signer(certs, "coordinator")
    forged = pb.BaseProof(round_num=2, from_sha256=trusted, to_sha256=digest)
    for node_id in MEMBERS:
        evaluation = pb.MemberEvaluation(
            node_id=node_id, base_loss=5.0, candidate_loss=4.0, state_sha256=digest
        )
        sign_evaluation(coordinator, CONSORTIUM, 2, forged.from_sha256, evaluation)
        forged.evaluations.append(evaluation)
    honest = members.proofs
    members.proofs = lambda since: [*honest(since), forged]  # round 1's leads to its start
    refused = members.run(served)
    assert sorted(refused.failed_nodes) == sorted(MEMBERS)
    for reason in refused.failed_nodes.values():
        assert "round 2: 0 members' signed evaluations accept it, at least 2 must" in reason
    # Why, in full (the coordinator's report of a node's refusal is cut to a bound).
    trust = members.servicers["n0"]._trust
    assert trust is not None
    with pytest.raises(CycleRefused) as why:
        trust.check(digest, [*honest(1), forged])
    assert "is signed by spiffe://tapestry-validated/coordinator, not by that member" in str(
        why.value
    )


def test_a_revoked_members_signature_does_not_count(
    consortium: tuple[Consortium, Served], certs: Layout, tmp_path: Path
) -> None:
    members, served = consortium
    members.run(served)
    (proof,) = base_proofs(members.records, 1)
    fresh = BaseTrust("n1", CONSORTIUM, tmp_path / "fresh", members.check, 2, 0.01)
    fresh.trained_from(proof.from_sha256)
    fresh.check(proof.to_sha256, [proof])  # three members signed it

    # Signed by n0 and n2 only, and n2 revoked since: one acceptance is left.
    kept = [e for e in proof.evaluations if e.node_id in ("n0", "n2")]
    del proof.evaluations[:]
    proof.evaluations.extend(kept)
    fresh.check(proof.to_sha256, [proof])
    revoke_member(certs.root, "node", "n2")
    with pytest.raises(CycleRefused) as refused:
        fresh.check(proof.to_sha256, [proof])
    assert "1 members' signed evaluations accept it, at least 2 must" in str(refused.value)
    assert "is revoked" in str(refused.value)


def test_a_result_signed_with_another_members_key_is_refused(tmp_path: Path, certs: Layout) -> None:
    members = Consortium(tmp_path, certs)
    members.servicers["n0"]._signer = _signer(certs, "node", "n1")  # n0 signs as n1
    with served_nodes(
        tmp_path, members.servicers, spec=SPEC, consortium_id=CONSORTIUM, chunk_bytes=CHUNK_BYTES
    ) as served:
        result = members.run(served)

    assert list(result.failed_nodes) == ["n0"]
    # its result header is refused before any of its delta is asked for
    assert (
        "the result header's signature does not hold: signed by "
        "spiffe://tapestry-validated/node/n1, not by node 'n0'"
    ) in result.failed_nodes["n0"]
    assert result.accepted_nodes == ["n1", "n2"]


def test_a_result_header_its_node_did_not_sign_is_refused(tmp_path: Path, certs: Layout) -> None:
    """What a member claims (its held-out numbers, quality, tokens) is its signed word: a
    header without its signature fails the member, before its delta is asked for."""
    members = Consortium(tmp_path, certs)
    members.servicers["n2"]._sign_header = lambda contribution: None  # type: ignore[method-assign]
    with served_nodes(
        tmp_path, members.servicers, spec=SPEC, consortium_id=CONSORTIUM, chunk_bytes=CHUNK_BYTES
    ) as served:
        result = members.run(served)

    assert list(result.failed_nodes) == ["n2"]
    assert "the result header is not signed (ContributionStatement)" in result.failed_nodes["n2"]
    assert result.accepted_nodes == ["n0", "n1"]
