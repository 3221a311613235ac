"""The proofs a cycle's start carries that its base was accepted by the members
(``CycleStart.base_proofs``, checked by :mod:`tapestry.node.base_trust`).

Each committed round that member-validated commit moved the base records the step it
committed and every member's signed evaluation of it (the journal's ``RoundValidation``).
A node that trained round ``L`` last knows the base it trained from; the proofs of the
rounds from ``L`` on lead from there to the base now, and a rollback in that span brings
the proof of the round whose base it restores. Built from the journal's records, never from
anything a member sent this round.
"""

from __future__ import annotations

from collections.abc import Sequence

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.limits import MAX_BASE_PROOFS, MAX_RECEIPTS_BYTES


def base_proofs(records: Sequence[pb.RoundRecord], since_round: int) -> list[pb.BaseProof]:
    """The proofs of the commits from round ``since_round`` on (oldest first, the newest
    :data:`~tapestry.limits.MAX_BASE_PROOFS`), a rollback's restored round's in its place."""
    by_round = {record.result.round_num: record for record in records}
    proofs = []
    for record in records:
        result = record.result
        if result.round_num < since_round:
            continue
        if result.HasField("rolled_back_to"):
            restored = by_round.get(result.rolled_back_to)
            record = restored if restored is not None else record
        proof = _proof(record.result)
        if proof is not None:
            proofs.append(proof)
    return proofs[-MAX_BASE_PROOFS:]


def _proof(result: pb.ConsortiumRoundResult) -> pb.BaseProof | None:
    """The committed step of a validated round, with the signed evaluations of it."""
    validation = result.validation
    if (
        not result.HasField("validation")
        or not validation.HasField("committed_scale")
        or result.shared_base_sha256 == result.previous_base_sha256
    ):
        return None
    for attempt in validation.attempts:
        committed = (attempt.scale, attempt.dropped) == (
            validation.committed_scale,
            validation.dropped,
        )
        if committed:
            signed = [e for e in attempt.evaluations if e.HasField("signature")]
            kept = result.member_certificates
            return pb.BaseProof(
                round_num=result.round_num,
                from_sha256=result.previous_base_sha256,
                to_sha256=result.shared_base_sha256,
                evaluations=signed,
                certificates={e.node_id: kept[e.node_id] for e in signed if e.node_id in kept},
            )
    return None


def receipts(records: Sequence[pb.RoundRecord], since_round: int) -> list[pb.RoundRecord]:
    """A member's receipts (``CycleStart.receipts``): the journal's signed records from round
    ``since_round`` (the newest it trained) on, oldest first, the newest
    :data:`~tapestry.limits.MAX_BASE_PROOFS` and at most
    :data:`~tapestry.limits.MAX_RECEIPTS_BYTES` of them."""
    chosen = [r for r in records if r.result.round_num >= since_round][-MAX_BASE_PROOFS:]
    while chosen and sum(r.ByteSize() for r in chosen) > MAX_RECEIPTS_BYTES:
        chosen.pop(0)
    return chosen
