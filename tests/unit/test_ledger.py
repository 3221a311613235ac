"""The ledger: the coordinator's journal chained and signed as it commits, and `tapestry
ledger verify`, which passes an intact journal and names the round and what differs in
every other: a flipped byte in a base file, a changed weight (even re-signed with the
coordinator's key), a removed round, a reordered chain, a revoked signer, an unsigned or
pre-ledger record, a verdict the members' evaluations do not give, an accepted contribution
without its member's signature (offline and over the RPCs), an evaluation without its
member's."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from tapestry.cli import main
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.journal import CoordinatorStore, record_digest
from tapestry.coordinator.ledger_check import Trust, acceptance_problems, check_ledger
from tapestry.coordinator.ledger_copy import copy_ledger
from tapestry.pki.authority import init_consortium, revoke_certificate
from tapestry.pki.signing import Signer
from tapestry.pki.statements import contribution_statement, sign_evaluation, signed_bytes
from tapestry.state_files import load_state
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ConsortiumRoundResult,
    ContributionPolicy,
    ModelSpec,
    SovereignTrainingNode,
)
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy, Attempt
from tapestry.training.consortium.messages import MemberEvaluation
from tapestry.training.consortium.strategies.settings import (
    IntegrationStrategy,
    OuterOptimizer,
    StrategyName,
)
from tapestry.training.consortium.tensors import state_digest
from tapestry.wire.codec import (
    member_evaluation_to_proto,
    message_from_json,
    message_to_json,
    round_result_to_proto,
    signature_to_proto,
)

SPEC = ModelSpec(hidden_size=4)
QUALITY = {"vn": 0.9, "ch": 0.7, "in": 0.8}
OPERATOR = "spiffe://acme/operator/alice"


def _nodes() -> list[SovereignTrainingNode]:
    model = SPEC.build(seed=0)
    return [
        SovereignTrainingNode(
            n, n.title(), model, [list(f"{n} text for training".encode())], q, 1, seed=5,
            heldout_corpus=[list(f"{n} held out".encode())],
        )
        for n, q in QUALITY.items()
    ]  # fmt: skip


class Journal:
    """A coordinator's data directory, its rounds committed by the core through a store
    that signs with the coordinator's key of the consortium ``acme`` (``signed=False``: a
    coordinator serving plaintext, whose members sign nothing either). Each member of
    ``nodes`` signs its contribution over its ContributionStatement, as its delta's trailer
    carries it over the services, and each of its evaluations over its EvaluationStatement,
    as its node service answers. The members in ``unsigned`` never sign their contribution
    (as for a delta never fetched); their node services sign their evaluations all the
    same."""

    def __init__(
        self,
        root: Path,
        *,
        signed: bool = True,
        policy: ContributionPolicy | None = None,
        unsigned: Collection[str] = (),
        nodes: Collection[str] = tuple(QUALITY),
    ) -> None:
        hosts = [(n, "h") for n in nodes]
        self.pki = init_consortium(root / "pki", "acme", coordinator_hosts=["h"], nodes=hosts)
        self.members = {} if not signed else {n: self.signer(n) for n in nodes}
        self.unsigned = set(unsigned)
        self.data = root / "data"
        self.store = CoordinatorStore(self.data, self.signer() if signed else None)
        self.store.check_identity({"consortium_id": "acme", "seed": 1})
        policy = policy or ContributionPolicy(max_node_weight=0.6, max_delta_norm_ratio=10.0)
        self.core = ConsortiumCoordinator(
            SPEC.build(seed=1), policy, acceptance=AcceptancePolicy(), min_nodes=2
        )
        self.store.save_initial_base(self.core.shared_base_state)

    def signer(self, node_id: str = "") -> Signer:
        """The coordinator's signer, or member ``node_id``'s."""
        pair = self.pki.member("node", node_id) if node_id else self.pki.coordinator
        return Signer.from_files(pair / "cert.pem", pair / "key.pem", self.pki.ca_cert)

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self.core.run_round(_nodes(), commit=self._commit)

    def _commit(self, result: ConsortiumRoundResult) -> None:
        signed = self._evaluations_signed(result)
        self.store.commit_round(
            signed, "", OPERATOR, self._signatures(result), self._signatures(result, header=True)
        )

    def _evaluations_signed(self, result: ConsortiumRoundResult) -> ConsortiumRoundResult:
        """``result`` with each signing member's evaluations signed, over the
        EvaluationStatement of the round and the base it trained from, as a member's node
        service signs each evaluation it answers."""
        if result.validation is None:
            return result

        def signed(evaluation: MemberEvaluation) -> MemberEvaluation:
            member = self.members.get(evaluation.node_id)
            if member is None:
                return evaluation
            answer = member_evaluation_to_proto(evaluation)
            base = result.previous_base_sha256
            sign_evaluation(member, "acme", result.round_num, base, answer)
            return replace(evaluation, signature=answer.signature.SerializeToString())

        def each(attempts: tuple[Attempt, ...]) -> tuple[Attempt, ...]:
            return tuple(
                replace(a, evaluations=tuple(map(signed, a.evaluations))) for a in attempts
            )

        validation = result.validation
        return replace(
            result,
            validation=replace(
                validation, attempts=each(validation.attempts), probes=each(validation.probes)
            ),
        )

    def _signatures(
        self, result: ConsortiumRoundResult, *, header: bool = False
    ) -> dict[str, pb.Signature]:
        """Each signing member's signature over its contribution to ``result``: over its
        delta (``unsigned`` members never sign one, as for a delta never fetched), or with
        ``header`` over its result header (every signing member signs that)."""
        signed = {}
        for contribution in round_result_to_proto(result).contributions:
            member = self.members.get(contribution.node_id)
            if member is None or (contribution.node_id in self.unsigned and not header):
                continue
            statement = contribution_statement(
                "acme", result.round_num, result.previous_base_sha256, contribution,
                contribution.weight_delta_sha256,
            )  # fmt: skip
            signed[contribution.node_id] = signature_to_proto(member.sign(statement))
        return signed

    def path(self, round_num: int) -> Path:
        return self.data / "rounds" / f"round-{round_num:06d}.json"

    def record(self, round_num: int) -> pb.RoundRecord:
        return message_from_json(self.path(round_num).read_text(), pb.RoundRecord)

    def write(self, record: pb.RoundRecord) -> None:
        self.path(record.result.round_num).write_text(message_to_json(record))

    def problems(self, *, crl: bool = False, allow_unsigned: bool = False) -> list[str]:
        trust = Trust.from_files(
            self.pki.ca_cert, self.pki.crl if crl else None, allow_unsigned=allow_unsigned
        )
        return check_ledger(self.data, trust).problems


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    journal = Journal(tmp_path)
    journal.run(3)
    return journal


def _verify(journal: Journal, *extra: str):
    return CliRunner().invoke(
        main,
        ["ledger", "verify", "--data-dir", str(journal.data), "--ca", str(journal.pki.ca_cert),
         *extra],
    )  # fmt: skip


def test_an_intact_journal_verifies_and_names_its_head(journal: Journal) -> None:
    records = journal.store.records()
    assert [r.result.round_num for r in records] == [1, 2, 3]
    # chained: round 1 to the initial base, each next one to the record before it
    assert records[0].previous_record_sha256 == records[0].result.previous_base_sha256
    assert records[1].previous_record_sha256 == record_digest(records[0])
    assert records[2].previous_record_sha256 == record_digest(records[1])
    assert all(r.result.operator == OPERATOR and r.HasField("signature") for r in records)
    assert all(r.result.delta_norms.keys() == QUALITY.keys() for r in records)
    assert any(r.result.contribution_weights for r in records)
    assert all(r.result.HasField("validation") for r in records if r.result.accepted_nodes)
    # every accepted contribution carries its member's signature, the certificate kept once
    for record in records:
        weighed = [
            c for c in record.result.contributions if c.node_id in record.result.accepted_nodes
        ]
        assert weighed and all(c.HasField("signature") for c in weighed)
        assert sorted(record.result.member_certificates) == sorted(QUALITY)
    # and every evaluation its validation recorded, its member's
    evaluations = [e for r in records for a in r.result.validation.attempts for e in a.evaluations]
    assert evaluations and all(e.HasField("signature") for e in evaluations)

    result = _verify(journal, "--crl", str(journal.pki.crl))
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"ledger verified: 3 round(s), head {record_digest(records[2])}, signed by "
        "spiffe://acme/coordinator\n"
    )


def test_a_diloco_journal_with_clipped_deltas_verifies_and_checks_its_momentum(
    tmp_path: Path,
) -> None:
    diloco = IntegrationStrategy(
        StrategyName.DILOCO, outer=OuterOptimizer(0.5, 0.5), clip_delta_norm=1e-3
    )
    journal = Journal(tmp_path, policy=ContributionPolicy(weighting="equal", strategy=diloco))
    journal.run(2)
    assert journal.record(2).result.outer_momentum_sha256
    assert journal.problems() == []
    (journal.data / "momentum" / "round-000002.safetensors").unlink()
    assert journal.problems() == ["round 2: the momentum file round-000002.safetensors is missing"]


def test_a_flipped_byte_in_a_base_file_names_the_round_and_both_digests(journal: Journal) -> None:
    path = journal.data / "base" / "round-000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last tensor's last byte: still a readable file
    path.write_bytes(bytes(data))
    recorded = journal.record(2).result.shared_base_sha256
    [problem] = journal.problems()
    assert problem.startswith("round 2: the base file round-000002.safetensors has digest ")
    assert problem.endswith(f", the record says {recorded[:12]}")

    result = _verify(journal)
    assert result.exit_code == 1
    assert result.stdout == problem + "\n"


def test_a_changed_weight_fails_its_signature_and_the_next_link(journal: Journal) -> None:
    record = journal.record(2)
    node = sorted(record.result.contribution_weights)[0]
    was = record.result.contribution_weights[node]
    record.result.contribution_weights[node] = was + 0.01
    journal.write(record)
    assert journal.problems() == [
        "round 2: coordinator signature: the signature by spiffe://acme/coordinator does not "
        "match the signed bytes (changed since signed)",
        f"round 2: weight of {node} is {was + 0.01!r} in the record, the policy gives {was!r}",
        f"round 3: chain broken: previous_record_sha256 "
        f"{journal.record(3).previous_record_sha256[:12]} is not the digest of round 2's "
        f"record {record_digest(record)[:12]}",
    ]


def test_a_changed_weight_resigned_with_the_coordinators_key_is_still_found(
    journal: Journal,
) -> None:
    """Whoever holds the coordinator's key can re-sign and re-chain: the weights are decided
    again from the recorded policy, scores and norms, so the change shows anyway."""
    records = [journal.record(n) for n in (1, 2, 3)]
    node = sorted(records[0].result.contribution_weights)[0]
    was = records[0].result.contribution_weights[node]
    records[0].result.contribution_weights[node] = 0.5
    _resign(journal, records)
    assert journal.problems() == [
        f"round 1: weight of {node} is 0.5 in the record, the policy gives {was!r}"
    ]


def test_a_members_claimed_quality_changed_after_it_signed_is_named(journal: Journal) -> None:
    """A member's signature covers the quality score and token count its header claimed:
    whoever holds the coordinator's key cannot change what a member said it was worth."""
    records = [journal.record(n) for n in (1, 2, 3)]
    contribution = records[0].result.contributions[0]
    contribution.quality_score = 0.01
    _resign(journal, records)
    member = repr(contribution.node_id)
    changed = (
        f"the signature by spiffe://acme/node/{contribution.node_id} does not match the signed "
        "bytes (changed since signed)"
    )
    assert [p for p in journal.problems() if "contribution" in p] == [
        f"round 1: {member}'s contribution: {changed}",
        f"round 1: {member}'s contribution header: {changed}",
    ]


def test_a_removed_round_is_named(journal: Journal) -> None:
    journal.path(2).unlink()
    problems = journal.problems()
    assert problems[0] == "round 3: follows round 1: round 2 is missing or the chain is reordered"
    assert problems[1].startswith("round 3: chain broken: previous_record_sha256 ")
    assert problems[1].endswith("is not the digest of round 1's record " + (
        record_digest(journal.record(1))[:12]
    ))  # fmt: skip


def test_a_reordered_chain_is_named(journal: Journal) -> None:
    second, third = journal.path(2).read_text(), journal.path(3).read_text()
    journal.path(2).write_text(third)
    journal.path(3).write_text(second)
    problems = journal.problems()
    assert problems[:2] == [
        "round-000002.json: holds the record of round 3",
        "round-000003.json: holds the record of round 2",
    ]
    assert "round 3: follows round 1: round 2 is missing or the chain is reordered" in problems
    assert "round 2: follows round 3: round 4 is missing or the chain is reordered" in problems


def test_a_record_signed_by_a_revoked_certificate_fails(journal: Journal) -> None:
    serial = revoke_certificate(journal.pki.root, journal.pki.coordinator / "cert.pem")
    assert journal.problems() == []  # without the CRL nobody knows
    why = f"the signer's certificate (spiffe://acme/coordinator, serial {serial:x}) is revoked"
    assert journal.problems(crl=True) == [
        f"round {n}: coordinator signature: {why}" for n in (1, 2, 3)
    ]
    result = _verify(journal, "--crl", str(journal.pki.crl))
    assert result.exit_code == 1
    assert result.stderr == "ledger NOT verified: 3 problem(s) in 3 round(s)\n"


def test_unsigned_records_fail_unless_allowed(tmp_path: Path) -> None:
    """A plaintext consortium: neither the coordinator nor its members sign anything, and
    --allow-unsigned lets both pass."""
    journal = Journal(tmp_path, signed=False)
    journal.run(2)
    why = "not signed (written by a coordinator serving plaintext, --insecure); --allow-unsigned"
    unsigned = "carries no signature; --allow-unsigned lets it pass"
    assert journal.problems() == [
        line
        for n in (1, 2)
        for line in [
            f"round {n}: {why} lets it pass",
            *(
                line
                for c in journal.record(n).result.contributions
                for line in [
                    *(
                        [f"round {n}: node {c.node_id!r}'s accepted contribution {unsigned}"]
                        if c.node_id in journal.record(n).result.accepted_nodes
                        else []
                    ),
                    f"round {n}: node {c.node_id!r}'s contribution header {unsigned}",
                ]
            ),  # fmt: skip
            *(
                f"round {n}: step {attempt.scale:g}, {e.node_id!r}'s evaluation {unsigned}"
                for attempt in journal.record(n).result.validation.attempts
                for e in attempt.evaluations
            ),
        ]
    ]
    assert all(journal.record(n).result.accepted_nodes for n in (1, 2))
    assert all(journal.record(n).result.validation.attempts for n in (1, 2))
    assert journal.problems(allow_unsigned=True) == []
    result = _verify(journal, "--allow-unsigned")
    assert result.exit_code == 0, result.output
    assert "signed by nobody (unsigned, allowed)" in result.output


def test_a_journal_from_before_the_ledger_is_refused_by_name(journal: Journal) -> None:
    for n in (1, 2):
        record = journal.record(n)
        record.ClearField("previous_record_sha256")
        record.ClearField("signature")
        for contribution in record.result.contributions:  # members did not sign then either
            contribution.ClearField("signature")
        journal.write(record)
    problems = journal.problems()
    old = "recorded before the ledger (no chain link and no signature): this journal cannot be "
    assert problems[:2] == [f"round {n}: {old}verified" for n in (1, 2)]  # said once a round
    assert problems[2].startswith("round 3: chain broken")  # it chained to the original
    assert len(problems) == 3
    # the coordinator resumes it all the same, and chains its next round to it
    assert CoordinatorStore(journal.data).latest()[0] == 3  # type: ignore[index]


def test_a_damaged_newest_record_is_replaced_and_the_chain_holds(journal: Journal) -> None:
    """A crash that leaves round 3's base damaged: the coordinator resumes at round 2 and
    commits round 3 again, chained to round 2's record, not to the one it replaces."""
    (journal.data / "base" / "round-000003.safetensors").write_bytes(b"\x08\x00")
    assert journal.problems()[0].startswith("round 3: the base file round-000003.safetensors ")
    store = CoordinatorStore(journal.data, journal.signer())
    round_num, state, records = store.latest()  # type: ignore[misc]
    assert round_num == 2
    journal.store = store
    journal.core.load_base_state(state, 2, sha256=records[-1].result.shared_base_sha256)
    journal.run(1)
    replaced = journal.record(3)
    assert replaced.previous_record_sha256 == record_digest(journal.record(2))
    assert journal.problems() == []


def test_a_verdict_the_evaluations_do_not_give_is_named(journal: Journal) -> None:
    validated = [
        journal.record(n) for n in (1, 2, 3) if journal.record(n).result.validation.attempts
    ]
    result = validated[0].result
    first = result.validation.attempts[0]
    first.accepted = not first.accepted
    problems = acceptance_problems(result)
    assert problems[0].startswith(
        f"validation step 1: accepted is {first.accepted}, the rule says {not first.accepted} ("
    )


def test_verify_refuses_a_folder_without_a_journal(tmp_path: Path, journal: Journal) -> None:
    result = _verify(journal)
    assert result.exit_code == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        main, ["ledger", "verify", "--data-dir", str(empty), "--ca", str(journal.pki.ca_cert)]
    )
    assert result.exit_code == 1
    assert f"{empty} has no rounds/ folder: give a coordinator's --data-dir" in result.output
    shutil.rmtree(empty)


def _resign(journal: Journal, records: list[pb.RoundRecord]) -> None:
    """Sign ``records`` again with the coordinator's key and chain them again, as whoever
    holds that key could."""
    signer = journal.signer()
    for before, record in zip([None, *records], records, strict=False):
        if before is not None:
            record.previous_record_sha256 = record_digest(before)
        record.ClearField("signature")
        record.signature.CopyFrom(signature_to_proto(signer.sign(signed_bytes(record))))
        journal.write(record)


def test_a_members_signed_evaluation_changed_after_the_fact_is_named(journal: Journal) -> None:
    """Each member's evaluation in a record carries its own signature: the coordinator's
    key can re-sign the record, not the member's evaluation."""
    records = [journal.record(n) for n in (1, 2, 3)]
    result = records[0].result
    evaluation = result.validation.attempts[0].evaluations[0]
    assert evaluation.HasField("signature")
    evaluation.candidate_loss = evaluation.base_loss  # "it did not rise"
    _resign(journal, records)
    assert (
        f"round 1: step 1, {evaluation.node_id!r}'s evaluation: the signature by "
        f"spiffe://acme/node/{evaluation.node_id} does not match the signed bytes (changed "
        "since signed)"
    ) in journal.problems()


def test_a_revoked_members_signature_on_its_evaluation_is_named(journal: Journal) -> None:
    """A member signs its contribution and each of its evaluations every round: revoked,
    each of its signatures is named."""
    assert journal.problems(crl=True) == []
    node = journal.record(1).result.validation.attempts[0].evaluations[0].node_id
    revoke_certificate(journal.pki.root, journal.pki.member("node", node) / "cert.pem")
    problems = journal.problems(crl=True)
    evaluations = [p for p in problems if "'s evaluation: " in p]
    assert [p.split(": the signer")[0] for p in evaluations] == [
        f"round {n}: step {attempt.scale:g}, {node!r}'s evaluation"
        for n in (1, 2, 3)
        for attempt in journal.record(n).result.validation.attempts
        for e in attempt.evaluations
        if e.node_id == node
    ]
    contributions = [p for p in problems if "'s contribution: " in p]
    assert [p.split(":")[0] for p in contributions] == [f"round {n}" for n in (1, 2, 3)]
    assert all(f"{node!r}'s contribution" in p for p in contributions)
    headers = [p for p in problems if "'s contribution header: " in p]
    assert [p.split(":")[0] for p in headers] == [f"round {n}" for n in (1, 2, 3)]
    assert all("is revoked" in p for p in problems)
    assert len(problems) == len(evaluations) + len(contributions) + len(headers)


def _strip_evaluation_signature(
    journal: Journal, round_num: int, attempt: int, evaluation: int
) -> pb.MemberEvaluation:
    """Remove one recorded evaluation's signature, and re-sign and re-chain the records with
    the coordinator's key (as its thief could forge a round): the evaluation."""
    records = journal.store.records()
    stripped = records[round_num - 1].result.validation.attempts[attempt].evaluations[evaluation]
    assert stripped.HasField("signature")
    stripped.ClearField("signature")
    _resign(journal, records)
    return stripped


def test_an_evaluation_without_its_members_signature_fails_unless_allowed(
    journal: Journal,
) -> None:
    """The acceptance is decided again from the recorded evaluations: the coordinator's key
    can re-sign a record, not make an evaluation a member's. An unsigned one fails, naming
    the round, the step and the member."""
    assert journal.record(2).result.validation.attempts[0].scale == 1.0
    stripped = _strip_evaluation_signature(journal, 2, 0, 1)
    problem = (
        f"round 2: step 1, {stripped.node_id!r}'s evaluation carries no signature; "
        "--allow-unsigned lets it pass"
    )
    assert journal.problems() == [problem]
    result = _verify(journal)
    assert (result.exit_code, result.stdout) == (1, problem + "\n")

    assert journal.problems(allow_unsigned=True) == []
    assert _verify(journal, "--allow-unsigned").exit_code == 0


def _strip_accepted_signature(journal: Journal) -> tuple[list[pb.RoundRecord], str]:
    """Round 2's record with one accepted contribution's signature removed, re-signed and
    re-chained with the coordinator's key (as its thief could forge a round): the records,
    and the problem verify must name."""
    records = [journal.record(n) for n in (1, 2, 3)]
    result = records[1].result
    [contribution] = [c for c in result.contributions if c.node_id == result.accepted_nodes[0]]
    contribution.ClearField("signature")
    _resign(journal, records)
    problem = (
        f"round 2: node {contribution.node_id!r}'s accepted contribution carries no signature; "
        "--allow-unsigned lets it pass"
    )
    return records, problem


def test_an_accepted_contribution_without_its_members_signature_fails_unless_allowed(
    journal: Journal,
) -> None:
    """The coordinator's key can re-sign a record, not make a member's signature: a round
    whose accepted contribution carries none fails, naming the round and the member."""
    _, problem = _strip_accepted_signature(journal)
    assert journal.problems() == [problem]
    result = _verify(journal)
    assert (result.exit_code, result.stdout) == (1, problem + "\n")
    assert result.stderr == "ledger NOT verified: 1 problem(s) in 3 round(s)\n"

    # a journal written before members signed their deltas: allowed, said so on the command
    allowed = _verify(journal, "--allow-unsigned")
    assert allowed.exit_code == 0, allowed.output
    assert allowed.output.startswith("ledger verified: 3 round(s), head ")


def test_a_declined_contribution_never_fetched_needs_no_signature(tmp_path: Path) -> None:
    """A member the policy declines (below the quality floor) never sends its delta, so
    its contribution carries no signature: that passes. The same member accepted, unsigned,
    does not."""
    floor = ContributionPolicy(quality_floor=0.75, max_node_weight=0.6, max_delta_norm_ratio=10.0)
    journal = Journal(tmp_path / "declined", policy=floor, unsigned=["ch"])
    journal.run(2)
    for n in (1, 2):
        result = journal.record(n).result
        assert "ch" in result.rejected_nodes and "ch" not in result.accepted_nodes
        [declined] = [c for c in result.contributions if c.node_id == "ch"]
        assert not declined.HasField("signature")
        assert all(c.HasField("signature") for c in result.contributions if c.node_id != "ch")
    assert journal.problems() == []
    assert _verify(journal).exit_code == 0
    # what it claimed in its header is still its signed word: changed, it is named
    records = journal.store.records()
    [declined] = [c for c in records[0].result.contributions if c.node_id == "ch"]
    assert declined.HasField("header_signature")
    declined.quality_score = 0.1
    _resign(journal, records)
    assert [p.split(": the signature")[0] for p in journal.problems()] == [
        "round 1: 'ch''s contribution header"
    ]

    accepted = Journal(tmp_path / "accepted", unsigned=["ch"])
    accepted.run(1)
    assert "ch" in accepted.record(1).result.accepted_nodes
    assert accepted.problems() == [
        "round 1: node 'ch''s accepted contribution carries no signature; --allow-unsigned "
        "lets it pass"
    ]


class _Served:
    """A coordinator's RPCs as CoordinatorClient gives them (ListRoundRecords, GetBase),
    serving ``records`` and the journal's base files."""

    def __init__(self, journal: Journal, records: list[pb.RoundRecord]) -> None:
        self.journal, self.records = journal, records

    def iter_round_records(self) -> list[pb.RoundRecord]:
        return self.records

    def fetch_base(self, round_num: int) -> SimpleNamespace:
        state, _ = load_state(self.journal.store.base_path(round_num))
        return SimpleNamespace(state=state, sha256=state_digest(state))


def test_over_the_rpcs_an_accepted_contribution_must_be_signed_too(
    journal: Journal, tmp_path: Path
) -> None:
    """`ledger verify --coordinator` checks its copy (ledger_copy) with the same rule."""
    trust = Trust.from_files(journal.pki.ca_cert, journal.pki.crl)
    intact = tmp_path / "intact"
    assert copy_ledger(_Served(journal, journal.store.records()), intact) == []  # type: ignore[arg-type]
    assert check_ledger(intact, trust, momentum=False).problems == []

    records, problem = _strip_accepted_signature(journal)
    forged = tmp_path / "forged"
    assert copy_ledger(_Served(journal, records), forged) == []  # type: ignore[arg-type]
    assert check_ledger(forged, trust, momentum=False).problems == [problem]
    allowed = Trust.from_files(journal.pki.ca_cert, journal.pki.crl, allow_unsigned=True)
    assert check_ledger(forged, allowed, momentum=False).problems == []


DROP_ONE = AcceptancePolicy(max_halvings=1, drop_one=True)


def _dropping_journal(root: Path, acceptance: AcceptancePolicy = DROP_ONE) -> Journal:
    """A journal whose round 1 the drop-one fallback committed without the member whose
    delta spoils it (members judge by how near a weight is to 1), each member's
    contribution and evaluations signed; or another ``acceptance`` decided it."""
    from .test_member_validation import Judge

    journal = Journal(root, nodes=("vn", "ch", "rogue"))
    journal.core = ConsortiumCoordinator(
        SPEC.build(seed=1), ContributionPolicy(max_node_weight=0.5), acceptance=acceptance,
        min_nodes=2,
    )  # fmt: skip
    members = [Judge("vn", 1.0, 1.0), Judge("ch", 1.0, 1.0), Judge("rogue", -9.9, 1.0, True)]
    journal.core.run_round(members, commit=journal._commit)
    return journal


def test_a_round_committed_without_one_member_verifies_and_a_changed_drop_is_named(
    tmp_path: Path,
) -> None:
    journal = _dropping_journal(tmp_path)
    result = journal.record(1).result
    assert result.validation.dropped == "rogue" and result.validation.drop_one
    assert [a.dropped for a in result.validation.attempts] == ["", "", "vn", "ch", "rogue"]
    assert list(result.accepted_nodes) == ["vn", "ch"]
    assert all(e.HasField("signature") for a in result.validation.attempts for e in a.evaluations)
    assert journal.problems() == []

    forged = pb.ConsortiumRoundResult()
    forged.CopyFrom(result)
    forged.validation.dropped = "vn"  # says it left out another member
    assert "committed without 'vn', the rule commits without 'rogue'" in acceptance_problems(forged)
    forged.CopyFrom(result)
    del forged.validation.attempts[2]  # hides that leaving out vn was tried
    assert any("tries leaving out 'vn'" in p for p in acceptance_problems(forged))
    forged.CopyFrom(result)
    forged.contribution_weights["rogue"] = 0.1  # weighs the member it says it left out
    journal.write(pb.RoundRecord(result=forged))
    assert any("weight of rogue" in p for p in journal.problems())


def test_an_unsigned_evaluation_names_the_step_or_the_contribution_left_out(
    tmp_path: Path,
) -> None:
    """An evaluation of a shorter step is named by its scale; one of the drop-one
    fallback's candidates, by the contribution that candidate leaves out."""
    journal = _dropping_journal(tmp_path)
    attempts = journal.record(1).result.validation.attempts
    assert (attempts[1].scale, attempts[1].dropped, attempts[2].dropped) == (0.5, "", "vn")
    half = _strip_evaluation_signature(journal, 1, 1, 0)
    without = _strip_evaluation_signature(journal, 1, 2, 1)
    unsigned = "evaluation carries no signature; --allow-unsigned lets it pass"
    assert journal.problems() == [
        f"round 1: step 0.5, {half.node_id!r}'s {unsigned}",
        f"round 1: without 'vn', {without.node_id!r}'s {unsigned}",
    ]
    assert journal.problems(allow_unsigned=True) == []


def test_a_round_weighed_by_evaluations_verifies_and_a_changed_probe_is_named(
    tmp_path: Path,
) -> None:
    from tapestry.coordinator.ledger_check import evaluated_problems

    journal = _dropping_journal(tmp_path, AcceptancePolicy(measure=True))
    result = journal.record(1).result
    assert [p.dropped for p in result.validation.probes] == ["", "vn", "ch", "rogue"]
    scores = dict(result.quality_scores)
    assert scores["vn"] == scores["ch"] == 1.0 and scores["rogue"] < 1e-15
    assert set(result.quality_sources.values()) == {pb.QUALITY_SOURCE_EVALUATED}
    assert journal.problems() == []

    forged = pb.ConsortiumRoundResult()
    forged.CopyFrom(result)
    # the rogue's "without me the others are worse": 9 nats on each other member
    for evaluation in forged.validation.probes[3].evaluations:
        evaluation.candidate_loss += 9.0
    problems = evaluated_problems(forged)
    assert problems[0].startswith("probe 4: accepted is True, the rule says False")
    assert f"rogue's evaluated score is {scores['rogue']!r}, the probes give 1.0" in problems
    forged.CopyFrom(result)
    forged.quality_sources["vn"] = pb.QUALITY_SOURCE_SELF_REPORTED
    assert evaluated_problems(forged) == ["vn is weighed by another score than the probes give"]
    forged.CopyFrom(result)
    del forged.validation.probes[3]  # hides the probe that scored the rogue 0
    assert f"rogue's evaluated score is {scores['rogue']!r}, the probes give None" in (
        evaluated_problems(forged)
    )
    # a probe's evaluation the coordinator wrote itself, unsigned, is named
    records = [journal.record(1)]
    records[0].result.validation.probes[1].evaluations[0].ClearField("signature")
    _resign(journal, records)
    assert journal.problems() == [
        "round 1: probe without 'vn', 'vn''s evaluation carries no signature; "
        "--allow-unsigned lets it pass"
    ]
