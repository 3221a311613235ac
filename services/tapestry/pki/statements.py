"""Members' signed evaluations (member-validated commit), and what checks them.

A member signs each evaluation of a step toward a round's candidate with its ``[tls]`` key:
the bytes signed are an ``EvaluationStatement`` (consortium, round, member, the base it
trained from, the state it judged, its two losses), serialized deterministically. The
coordinator checks a signature as the evaluation arrives and records it with the round; a
node checks the signatures of the commits that lead to a base before it trains from it
(:mod:`tapestry.node.base_trust`). Who signed is the certificate's, checked against the
consortium CA and its CRL (:func:`~tapestry.pki.signing.verify_signature`): a signature the
coordinator made with its own key names the coordinator, never a member.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography import x509

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import quoted
from tapestry.limits import MAX_PEER_NAME_CHARS
from tapestry.pki.access import Peer, RevocationList
from tapestry.pki.signing import Signature, SignatureError, Signer, verify_signature


def signed_bytes(record: pb.RoundRecord) -> bytes:
    """What the coordinator signs of a journal record (the ledger; a member's receipt): the
    record's deterministic binary serialization with its ``signature`` cleared."""
    unsigned = pb.RoundRecord()
    unsigned.CopyFrom(record)
    unsigned.ClearField("signature")
    return unsigned.SerializeToString(deterministic=True)


def evaluation_statement(
    consortium_id: str, round_num: int, base_sha256: str, evaluation: pb.MemberEvaluation
) -> bytes:
    """The bytes a member signs for ``evaluation`` of round ``round_num`` from the base of
    digest ``base_sha256``."""
    statement = pb.EvaluationStatement(
        consortium_id=consortium_id,
        round_num=round_num,
        node_id=evaluation.node_id,
        base_sha256=base_sha256,
        state_sha256=evaluation.state_sha256,
        base_loss=evaluation.base_loss,
        candidate_loss=evaluation.candidate_loss,
    )
    return statement.SerializeToString(deterministic=True)


def contribution_statement(
    consortium_id: str,
    round_num: int,
    base_sha256: str,
    contribution: pb.SovereignContribution,
    delta_sha256: str,
) -> bytes:
    """The bytes a node signs for ``contribution`` (its header's: the held-out numbers,
    quality score and token count it claims; the delta of digest ``delta_sha256``) of round
    ``round_num``, trained from the base of ``base_sha256``."""
    statement = pb.ContributionStatement(
        consortium_id=consortium_id,
        round_num=round_num,
        node_id=contribution.node_id,
        base_sha256=base_sha256,
        delta_sha256=delta_sha256,
        quality_score=contribution.quality_score,
        token_count=contribution.token_count,
    )
    if contribution.HasField("evaluation"):
        statement.evaluation.CopyFrom(contribution.evaluation)
    return statement.SerializeToString(deterministic=True)


def sign_evaluation(
    signer: Signer,
    consortium_id: str,
    round_num: int,
    base_sha256: str,
    evaluation: pb.MemberEvaluation,
) -> None:
    """Sign ``evaluation`` in place (its ``signature``)."""
    signed = signer.sign(evaluation_statement(consortium_id, round_num, base_sha256, evaluation))
    evaluation.signature.CopyFrom(
        pb.Signature(certificate=signed.certificate, signature=signed.signature)
    )


class SignatureCheck:
    """Checks members' signatures against the consortium CA and its CRL (read again when
    the file changes, :class:`~tapestry.pki.access.RevocationList`, so a revocation counts
    at once)."""

    def __init__(self, ca: Path, crl: Path | None = None) -> None:
        self._ca = x509.load_pem_x509_certificate(ca.read_bytes())
        self._revocations = None if crl is None else RevocationList(crl, ca)

    def signer(self, signature: pb.Signature, payload: bytes) -> Peer:
        """Who signed ``payload``; :class:`SignatureError` saying why when it does not hold."""
        revoked = self._revocations.serials() if self._revocations else frozenset()
        return verify_signature(
            Signature(signature.certificate, signature.signature), payload, self._ca, revoked
        )

    def signed_by(self, signature: pb.Signature, payload: bytes, node_id: str) -> str | None:
        """Why ``signature`` over ``payload`` is not ``node_id``'s (``None`` when it is)."""
        try:
            who = self.signer(signature, payload)
        except SignatureError as error:
            return str(error)
        if (who.role, who.name) != ("node", node_id):
            return f"signed by {who.uri}, not by node {quoted(node_id, MAX_PEER_NAME_CHARS)}"
        return None

    def evaluation_problem(
        self,
        consortium_id: str,
        round_num: int,
        base_sha256: str,
        evaluation: pb.MemberEvaluation,
    ) -> str | None:
        """Why ``evaluation`` is not its member's, signed (``None`` when it is)."""
        member = quoted(evaluation.node_id, MAX_PEER_NAME_CHARS)
        if not evaluation.HasField("signature"):
            return f"the evaluation by {member} is not signed"
        payload = evaluation_statement(consortium_id, round_num, base_sha256, evaluation)
        try:
            who = self.signer(evaluation.signature, payload)
        except SignatureError as error:
            return str(error)
        if (who.role, who.name) != ("node", evaluation.node_id):
            return f"the evaluation by {member} is signed by {who.uri}, not by that member"
        return None


def _signed_parts(result: pb.ConsortiumRoundResult) -> Iterator[tuple[pb.Signature, str]]:
    """Every member signature a round's result holds, with whose it says it is."""
    for contribution in result.contributions:
        if contribution.HasField("signature"):
            yield contribution.signature, contribution.node_id
        if contribution.HasField("header_signature"):
            yield contribution.header_signature, contribution.node_id
    for attempt in [*result.validation.attempts, *result.validation.probes]:
        for evaluation in attempt.evaluations:
            if evaluation.HasField("signature"):
                yield evaluation.signature, evaluation.node_id


def hoist_certificates(result: pb.ConsortiumRoundResult) -> None:
    """Keep each signing member's certificate once in ``result.member_certificates`` and
    clear it from its signatures (a member signs its delta and each step it evaluated: the
    same certificate several times a round). A signature whose certificate is not the one
    kept for its member keeps its own."""
    kept = result.member_certificates
    for signature, node_id in _signed_parts(result):
        if not signature.certificate:
            continue
        if node_id not in kept:
            kept[node_id] = signature.certificate
        if kept[node_id] == signature.certificate:
            signature.certificate = b""


def with_certificate(
    signature: pb.Signature, certificates: Mapping[str, bytes], node_id: str
) -> pb.Signature:
    """``signature``, with the certificate kept for ``node_id`` where it carries none."""
    if signature.certificate or node_id not in certificates:
        return signature
    full = pb.Signature()
    full.CopyFrom(signature)
    full.certificate = certificates[node_id]
    return full
