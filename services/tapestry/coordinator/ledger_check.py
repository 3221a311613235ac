"""Check a coordinator's ledger offline (``tapestry ledger verify``): everything the journal
claims, against the consortium CA and the files beside it.

For every round record in ``<data-dir>/rounds`` (consortium.proto's RoundRecord says what is
chained and signed), in order:

- **the chain**: the file's name is the record's round, rounds run 1, 2, 3, … without a gap,
  and each record carries the digest of the record before it (round 1: the initial base's
  state digest), so a removed, inserted, reordered or rewritten record breaks it; each
  round's ``previous_base_sha256`` is the base the round before committed;
- **the signature**: the coordinator's, by a certificate the consortium CA issued, valid when
  the round finished, not in the CRL and naming the coordinator (an unsigned record, from a
  coordinator serving plaintext, fails unless unsigned records are allowed);
- **the members' signatures**: each contribution and evaluation a member signed, over its
  ContributionStatement or EvaluationStatement, by that member (against the CA and CRL);
  every contribution the round accepted, and every evaluation its validation recorded,
  must carry one (unless unsigned records are allowed); a contribution the policy declined
  before its delta was fetched carries none;
- **the files**: the round's base file, and its momentum file where it names one, have the
  digest the record holds (the state digest, recomputed from the tensors); a rollback's base
  is the base of the round it restores;
- **the decision**: the round's weights and the policy's rejection reasons, decided again by
  the core's own :class:`~tapestry.training.consortium.ContributionPolicy` from the
  recorded policy, quality scores and delta norms; and its acceptance, decided again by
  the core's :func:`~tapestry.training.consortium.governance.acceptance.validate` from the
  recorded rule and members' evaluations (each step's verdict, the scale committed, a
  lone objection committed over).

What it cannot check from the journal alone: that the deltas were what their digests say
(they are not kept) and so that the base is the integration of them, or that the quality
scores are what a measurement would give; those rest on the members' own records.

Each problem is one line naming the round (or file) and what differs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.journal import (
    IDENTITY,
    CoordinatorStore,
    read_identity,
    record_digest,
)
from tapestry.errors import UserError, quoted
from tapestry.limits import MAX_PEER_NAME_CHARS
from tapestry.pki.authority import consortium_of
from tapestry.pki.credentials import CredentialError, revoked_serials
from tapestry.pki.signing import SignatureError, verify_signature
from tapestry.pki.statements import (
    contribution_statement,
    evaluation_statement,
    signed_bytes,
    with_certificate,
)
from tapestry.state_files import load_state
from tapestry.training.consortium.governance.acceptance import (
    AcceptancePolicy,
    Attempt,
    Verdict,
    evaluated_scores,
    validate,
)
from tapestry.training.consortium.messages import MemberEvaluation
from tapestry.training.consortium.round.stages import NOT_ACCEPTED, OVERFLOW, decision_without
from tapestry.training.consortium.tensors import state_digest
from tapestry.wire.codec import (
    acceptance_policy_from_proto,
    member_evaluations_from_proto,
    message_from_json,
    policy_from_proto,
    signature_from_proto,
    timestamp_from_proto,
)


@dataclass
class LedgerReport:
    """What a check found: how many rounds it read, the digest of the newest record (the
    ledger's head), who signed, and one line per problem (none: everything holds)."""

    rounds: int = 0
    head: str = ""
    signers: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Trust:
    """What signatures are checked against: the consortium CA, the serials its CRL
    revokes, and whether an unsigned record (a coordinator serving plaintext) and an
    accepted contribution or a recorded evaluation without its member's signature (members
    serving plaintext, or a journal written before members signed them) are let pass."""

    ca: x509.Certificate
    revoked: Collection[int] = ()
    allow_unsigned: bool = False

    @classmethod
    def from_files(cls, ca: Path, crl: Path | None, *, allow_unsigned: bool = False) -> Trust:
        try:
            authority = x509.load_pem_x509_certificate(ca.read_bytes())
        except FileNotFoundError:
            raise CredentialError(f"CA certificate {ca} does not exist") from None
        except ValueError:
            raise CredentialError(f"CA certificate {ca} is not a PEM certificate") from None
        revoked = revoked_serials(crl, ca) if crl is not None else frozenset()
        return cls(authority, revoked, allow_unsigned)


def check_ledger(data_dir: Path, trust: Trust, *, momentum: bool = True) -> LedgerReport:
    """Every check of the module over the coordinator data directory ``data_dir`` (only
    read: it may be a live coordinator's). Without ``momentum`` the momentum files are not
    checked (a copy fetched over the RPCs, which do not serve them)."""
    if not (data_dir / "rounds").is_dir():
        raise LedgerError(f"{data_dir} has no rounds/ folder: give a coordinator's --data-dir")
    store = CoordinatorStore(data_dir, read_only=True)
    report = LedgerReport()
    consortium = consortium_of(trust.ca)
    # a copy fetched over the RPCs holds none (the server's certificate named the consortium)
    written = (data_dir / IDENTITY).exists()
    found = ((read_identity(data_dir) if written else None) or {}).get("consortium_id", consortium)
    if found != consortium:
        report.problems.append(
            f"{data_dir / IDENTITY}: the directory holds consortium {found!r}, the CA is "
            f"consortium {consortium!r}'s"
        )
    genesis, problem = _file_digest(store.base_path(0))
    if problem:
        report.problems.append(f"round 0: the initial base {problem}")
    records = _records(store, report)
    report.rounds = len(records)
    bases = {0: genesis}
    previous: pb.RoundRecord | None = None
    for record in records:
        result = record.result
        link = record.previous_record_sha256
        problems = [
            *_chain(record, previous, genesis),
            *_signature(record, trust, report.signers),
            *_member_signatures(result, trust, consortium, before_ledger=not link),
            *_files(store, record, bases, momentum=momentum),
            *decision_problems(result),
            *acceptance_problems(result),
            *evaluated_problems(result),
            *committed_step_problems(result),
        ]
        report.problems += [f"round {result.round_num}: {p}" for p in problems]
        bases[result.round_num] = result.shared_base_sha256
        previous = record
    report.head = record_digest(records[-1]) if records else genesis
    return report


class LedgerError(UserError):
    """A ledger that cannot be checked at all (no journal there)."""


def _records(store: CoordinatorStore, report: LedgerReport) -> list[pb.RoundRecord]:
    """Every record in the journal's folder in file-name order; a file that does not read,
    or whose name is not its record's round, is a problem."""
    records = []
    for path in sorted(store.rounds_dir.glob("round-*.json")):
        try:
            record = message_from_json(path.read_text(encoding="utf-8"), pb.RoundRecord)
        except Exception as error:
            report.problems.append(f"{path.name}: not a readable round record ({error})")
            continue
        if path.name != store.record_path(record.result.round_num).name:
            report.problems.append(
                f"{path.name}: holds the record of round {record.result.round_num}"
            )
        records.append(record)
    return records


def _chain(record: pb.RoundRecord, previous: pb.RoundRecord | None, genesis: str) -> Iterator[str]:
    """How ``record`` fails to follow ``previous`` (``None``: it is the first)."""
    result = record.result
    expected = 1 if previous is None else previous.result.round_num + 1
    if result.round_num != expected:
        after = "the journal starts" if previous is None else f"round {expected - 1}"
        yield f"follows {after}: round {expected} is missing or the chain is reordered"
    if not record.previous_record_sha256:
        yield (
            "recorded before the ledger (no chain link and no signature): this journal "
            "cannot be verified"
        )
        return
    link, what = (
        (genesis, "the initial base's digest")
        if previous is None
        else (record_digest(previous), f"the digest of round {previous.result.round_num}'s record")
    )
    if record.previous_record_sha256 != link:
        yield (
            f"chain broken: previous_record_sha256 {record.previous_record_sha256[:12]} is "
            f"not {what} {link[:12]}"
        )
    before = genesis if previous is None else previous.result.shared_base_sha256
    if result.previous_base_sha256 != before:
        yield (
            f"previous_base_sha256 {result.previous_base_sha256[:12]} is not the base in force "
            f"before it {before[:12]}"
        )


def _signature(record: pb.RoundRecord, trust: Trust, signers: set[str]) -> Iterator[str]:
    """How the coordinator's signature on ``record`` fails to hold."""
    if not record.previous_record_sha256:
        return  # recorded before the ledger: said once, by the chain
    if not record.HasField("signature"):
        if not trust.allow_unsigned:
            yield (
                "not signed (written by a coordinator serving plaintext, --insecure); "
                "--allow-unsigned lets it pass"
            )
        return
    result = record.result
    moment = timestamp_from_proto(result.finished_at) if result.HasField("finished_at") else None
    try:
        who = verify_signature(
            signature_from_proto(record.signature),
            signed_bytes(record),
            trust.ca,
            trust.revoked,
            at=moment,
        )
    except SignatureError as error:
        yield f"coordinator signature: {error}"
        return
    if who.role != "coordinator":
        yield f"signed by {who.uri}, not by the coordinator"
    signers.add(who.uri)


def _member_signatures(
    result: pb.ConsortiumRoundResult, trust: Trust, consortium: str, *, before_ledger: bool
) -> Iterator[str]:
    """How a member's signature on its recorded contribution or one of its evaluations fails
    to hold (over its ContributionStatement or EvaluationStatement: this consortium, the
    round, the base before it). A record from ``before_ledger`` is not asked for any (that
    it cannot be verified is said once, by the chain)."""
    moment = timestamp_from_proto(result.finished_at) if result.HasField("finished_at") else None
    required = not (trust.allow_unsigned or before_ledger)
    yield from _contribution_signatures(result, trust, consortium, moment, required=required)
    yield from _evaluation_signatures(result, trust, consortium, moment, required=required)


def _contribution_signatures(
    result: pb.ConsortiumRoundResult,
    trust: Trust,
    consortium: str,
    moment: datetime | None,
    *,
    required: bool,
) -> Iterator[str]:
    """How the members' signatures on the round's contributions fail to hold. With
    ``required`` (unless unsigned records are let pass: a plaintext consortium signs
    nothing, a journal written before members signed), every contribution must carry its
    member's signature over its result header (what it claimed), and every one the round
    accepted (weighed into its base) its signature over its delta too. A contribution the
    policy declined before its delta was fetched carries no delta signature."""
    accepted = {*result.accepted_nodes, *result.contribution_weights}
    for contribution in result.contributions:
        member = quoted(contribution.node_id, MAX_PEER_NAME_CHARS)
        delta = contribution.signature if contribution.HasField("signature") else None
        header = (
            contribution.header_signature if contribution.HasField("header_signature") else None
        )
        parts = (
            (delta, "contribution", "accepted contribution", contribution.weight_delta_sha256,
             contribution.node_id in accepted),
            (header, "contribution header", "contribution header",
             contribution.weight_delta_sha256, True),
        )  # fmt: skip
        for signature, what, unsigned, delta_sha256, needed in parts:
            if signature is None:
                if required and needed:
                    yield (
                        f"node {member}'s {unsigned} carries no signature; --allow-unsigned "
                        "lets it pass"
                    )
                continue
            statement = contribution_statement(
                consortium, result.round_num, result.previous_base_sha256, contribution,
                delta_sha256,
            )  # fmt: skip
            problem = _signed(signature, statement, contribution.node_id, trust, moment, result)
            if problem:
                yield f"{member}'s {what}{problem}"


def _evaluation_signatures(
    result: pb.ConsortiumRoundResult,
    trust: Trust,
    consortium: str,
    moment: datetime | None,
    *,
    required: bool,
) -> Iterator[str]:
    """How the members' signatures on the evaluations the round's validation recorded fail
    to hold. With ``required``, every evaluation must carry its member's: its acceptance
    is decided again from them, so an evaluation the coordinator wrote itself (an invented
    acceptance) must not pass as a member's. So must every probe's: the members' weights
    are scored again from them."""
    validation = result.validation
    labelled = [(_attempt_label(a), a) for a in validation.attempts] + [
        ("probe " + (_attempt_label(p) if p.dropped else "of the candidate"), p)
        for p in validation.probes
    ]
    for label, attempt in labelled:
        for evaluation in attempt.evaluations:
            member = quoted(evaluation.node_id, MAX_PEER_NAME_CHARS)
            if not evaluation.HasField("signature"):
                if required:
                    yield (
                        f"{label}, {member}'s evaluation carries no "
                        "signature; --allow-unsigned lets it pass"
                    )
                continue
            statement = evaluation_statement(
                consortium, result.round_num, result.previous_base_sha256, evaluation
            )
            problem = _signed(
                evaluation.signature, statement, evaluation.node_id, trust, moment, result
            )
            if problem:
                yield f"{label}, {member}'s evaluation{problem}"


def _attempt_label(attempt: pb.ValidationAttempt) -> str:
    """How a problem names a validation attempt: the step toward the candidate it tried
    (``step 0.5``), or the drop-one fallback's candidate it judged (``without 'x'``)."""
    if attempt.dropped:
        return f"without {quoted(attempt.dropped, MAX_PEER_NAME_CHARS)}"
    return f"step {attempt.scale:g}"


def _signed(
    signature: pb.Signature,
    statement: bytes,
    node_id: str,
    trust: Trust,
    moment: datetime | None,
    result: pb.ConsortiumRoundResult,
) -> str:
    """Why ``signature`` over ``statement`` is not ``node_id``'s, worded to follow what it
    is on ("": it is); its certificate, where it carries none, is the one the record keeps
    for that member (``member_certificates``)."""
    signature = with_certificate(signature, result.member_certificates, node_id)
    try:
        who = verify_signature(
            signature_from_proto(signature), statement, trust.ca, trust.revoked, at=moment
        )
    except SignatureError as error:
        return f": {error}"
    if (who.role, who.name) != ("node", node_id):
        return f" is signed by {who.uri}"
    return ""


def _files(
    store: CoordinatorStore,
    record: pb.RoundRecord,
    bases: Mapping[int, str],
    *,
    momentum: bool = True,
) -> Iterator[str]:
    """How the round's base and momentum files (unless not ``momentum``) differ from the
    digests it records."""
    result = record.result
    yield from _file_problem(store.base_path(result.round_num), result.shared_base_sha256, "base")
    if momentum and result.outer_momentum_sha256:
        path = store.momentum_path(result.round_num)
        yield from _file_problem(path, result.outer_momentum_sha256, "momentum")
    if result.HasField("rolled_back_to"):
        restored = bases.get(result.rolled_back_to)
        if restored != result.shared_base_sha256:
            yield (
                f"a rollback to round {result.rolled_back_to} whose base "
                f"{result.shared_base_sha256[:12]} is not that round's "
                f"{(restored or '(no such round)')[:12]}"
            )


def _file_problem(path: Path, recorded: str, what: str) -> Iterator[str]:
    """How the ``what`` file at ``path`` differs from the digest its record holds."""
    digest, problem = _file_digest(path)
    if problem:
        yield f"the {what} {problem}"
    elif digest != recorded:
        yield (
            f"the {what} file {path.name} has digest {digest[:12]}, the record says {recorded[:12]}"
        )


def _file_digest(path: Path) -> tuple[str, str]:
    """``(state digest, "")`` of a state file, or ``("", what is wrong with it)``."""
    try:
        state, _ = load_state(path)
    except FileNotFoundError:
        return "", f"file {path.name} is missing"
    except Exception as error:
        return "", f"file {path.name} does not read as a state file ({error})"
    return state_digest(state), ""


def decision_problems(result: pb.ConsortiumRoundResult) -> list[str]:
    """How the round's recorded weights and rejection reasons differ from what its
    recorded policy decides from its recorded quality scores and delta norms."""
    if result.HasField("rolled_back_to") or result.aborted_reason:
        what = "a rollback" if result.HasField("rolled_back_to") else "an aborted round"
        weighed = sorted({*result.accepted_nodes, *result.contribution_weights})
        return [f"{what} with accepted nodes or weights {weighed}"] if weighed else []
    if not result.HasField("policy"):
        return ["no policy recorded: its weights cannot be decided again"]
    try:
        policy = policy_from_proto(result.policy)
    except ValueError as error:
        return [f"the recorded policy cannot be read: {error}"]
    order = [c.node_id for c in result.contributions]  # the order the policy weighed them in
    missing = [n for n in order if n not in result.quality_scores]
    if missing or set(result.quality_scores) - set(order):
        return [
            f"quality scores {dict(result.quality_scores)} are not one per contribution {order}"
        ]
    norms = None
    if policy.needs_delta_norms:
        if any(n not in result.delta_norms for n in order):
            return [
                f"the policy weighs delta norms, the record holds "
                f"{dict(result.delta_norms)} for {order}"
            ]
        norms = {n: result.delta_norms[n] for n in order}
    scores = {n: result.quality_scores[n] for n in order}
    decision = policy.decide(scores, norms)
    dropped = result.validation.dropped if result.HasField("validation") else ""
    if dropped:  # validation committed the round without one contribution
        quorum = max(result.validation.quorum, 1)
        again = decision_without(policy, decision, scores, norms, dropped, quorum)
        if again is None:
            return [f"the round is committed without {dropped!r}, which the policy cannot do"]
        decision = again
    recorded = dict(result.contribution_weights)
    if decision.weights and not recorded:  # validation refused it, or it overflowed
        return _unintegrated(result, decision.weights)
    problems = [
        f"weight of {node} is {recorded.get(node, 'none')!r} in the record, the policy "
        f"gives {decision.weights.get(node, 'none')!r}"
        for node in sorted({*recorded, *decision.weights})
        if recorded.get(node) != decision.weights.get(node)
    ]
    if list(result.accepted_nodes) != [n for n in order if n in decision.weights]:
        problems.append(
            f"accepted nodes {list(result.accepted_nodes)}, the policy accepts "
            f"{[n for n in order if n in decision.weights]}"
        )
    problems += [
        f"rejection reason of {node} is {result.rejection_reasons.get(node, 'none')!r}, "
        f"the policy gives {reason!r}"
        for node, reason in decision.rejection_reasons.items()
        if result.rejection_reasons.get(node) != reason
    ]
    return problems


def _unintegrated(result: pb.ConsortiumRoundResult, weights: Mapping[str, float]) -> list[str]:
    """Why a round the policy gave weights integrated nothing, if the record says why."""
    refused = result.HasField("validation") and not result.validation.HasField("committed_scale")
    reasons = [result.rejection_reasons.get(node, "") for node in weights]
    if refused and all(r.startswith(f"{NOT_ACCEPTED}: ") for r in reasons):
        return []
    if not refused and all(r == OVERFLOW for r in reasons):
        return []  # its base overflowed: the deltas are not kept to check it
    return [
        f"no weights in the record, the policy gives {dict(weights)} and the record says "
        "no validation refused them nor overflow"
    ]


def acceptance_problems(result: pb.ConsortiumRoundResult) -> list[str]:
    """How the round's recorded validation differs from what its recorded rule decides on
    the recorded evaluations: each step's verdict, the scale committed, the lone objection
    committed over, the contributions the drop-one fallback tried leaving out and the one
    it left out."""
    if not result.HasField("validation"):
        return []
    recorded = result.validation
    try:
        policy = acceptance_policy_from_proto(recorded)
        steps = [_evaluations(a) for a in recorded.attempts if not a.dropped]
        drops = {(a.dropped, a.scale): _evaluations(a) for a in recorded.attempts if a.dropped}
    except ValueError as error:
        return [f"the recorded validation cannot be read: {error}"]
    asked: list[float] = []

    def evaluate(scale: float) -> tuple[MemberEvaluation, ...]:
        asked.append(scale)
        return steps[len(asked) - 1] if len(asked) <= len(steps) else ()

    if not recorded.attempts and recorded.probes:  # probed, and no one scored above 0
        accepted = bool(result.accepted_nodes or result.contribution_weights)
        return ["nodes were accepted, yet no candidate was validated"] if accepted else []
    outcome = validate(
        policy, evaluate, max(recorded.quorum, 1), drops=_droppable(result, policy),
        evaluate_without=lambda node_id, scale: drops.get((node_id, scale), ()),
    )  # fmt: skip
    problems = [
        f"validation step {i + 1}: {what}"
        for i, (attempt, tried) in enumerate(zip(recorded.attempts, outcome.attempts, strict=False))
        for what in _step_problems(attempt, tried)
    ]
    if len(outcome.attempts) != len(recorded.attempts):
        problems.append(
            f"validation tried {len(recorded.attempts)} step(s), the rule "
            f"{policy.rule.value} tries {len(outcome.attempts)} on these evaluations"
        )
    scale = recorded.committed_scale if recorded.HasField("committed_scale") else None
    if scale != outcome.scale:
        problems.append(f"committed scale {scale}, the rule commits {outcome.scale}")
    if tuple(recorded.committed_over) != outcome.committed_over:
        problems.append(
            f"committed over {list(recorded.committed_over)}, the rule commits over "
            f"{list(outcome.committed_over)}"
        )
    if recorded.dropped != outcome.dropped:
        problems.append(
            f"committed without {recorded.dropped!r}, the rule commits without {outcome.dropped!r}"
        )
    if scale is None and (result.accepted_nodes or result.contribution_weights):
        problems.append("the members' validation committed nothing, yet nodes were accepted")
    return problems


def evaluated_problems(result: pb.ConsortiumRoundResult) -> list[str]:
    """How the round's evaluated quality scores differ from what its recorded probes give
    (:func:`evaluated_scores`), each probe's verdict from what its rule says, and a member
    weighed by another score where the round probed."""
    if not result.HasField("validation"):
        return []
    recorded = result.validation
    weighed = {*result.accepted_nodes, *result.contribution_weights}
    if recorded.measure and not recorded.probes and len(weighed) > 1:
        return [f"measure_quality is on, yet {len(weighed)} members were weighed unprobed"]
    if recorded.probes and not recorded.measure:
        return ["the round holds probes, yet says measure_quality was off"]
    if not recorded.probes:
        return []
    try:
        policy = acceptance_policy_from_proto(recorded)
        probes = [
            Attempt(p.scale, _verdict(p), _evaluations(p), p.dropped) for p in recorded.probes
        ]
    except ValueError as error:
        return [f"the recorded probes cannot be read: {error}"]
    problems = [
        f"probe {i + 1}: {what}"
        for i, probe in enumerate(probes)
        for what in _step_problems(
            recorded.probes[i],
            Attempt(1.0, policy.judge(probe.evaluations, max(recorded.quorum, 1)),
                    probe.evaluations, probe.dropped),
        )
    ]  # fmt: skip
    if probes[0].dropped or len({p.dropped for p in probes}) != len(probes):
        problems.append("the probes are not the candidate then one without each member")
    evaluated = pb.QUALITY_SOURCE_EVALUATED
    scores = evaluated_scores(probes, policy.harm_scale)
    claimed = [n for n, source in result.quality_sources.items() if source == evaluated]
    for node in sorted({*scores, *result.accepted_nodes, *claimed}):
        if result.quality_sources.get(node) != evaluated:
            problems.append(f"{node} is weighed by another score than the probes give")
        elif result.quality_scores.get(node) != scores.get(node):
            problems.append(
                f"{node}'s evaluated score is {result.quality_scores.get(node)!r}, the probes "
                f"give {scores.get(node)!r}"
            )
    return problems


def _evaluations(attempt: pb.ValidationAttempt) -> tuple[MemberEvaluation, ...]:
    """The members' evaluations of ``attempt``; ``ValueError`` naming a member listed twice
    (the rule judges one evaluation per member, and would stop the check rather than name
    the round)."""
    evaluations = member_evaluations_from_proto(attempt)
    ids = [e.node_id for e in evaluations]
    twice = sorted({quoted(n, MAX_PEER_NAME_CHARS) for n in ids if ids.count(n) > 1})
    if twice:
        raise ValueError(f"{_attempt_label(attempt)} counts {', '.join(twice)} twice")
    return evaluations


def committed_step_problems(result: pb.ConsortiumRoundResult) -> list[str]:
    """The committed step's evaluations that do not name the base the round committed (each
    counted evaluation names the state it judged): a base no member judged, written in
    after the fact, is named by what they did judge."""
    validation = result.validation
    if not result.HasField("validation") or not validation.HasField("committed_scale"):
        return []
    chosen = (validation.committed_scale, validation.dropped)
    committed = next((a for a in validation.attempts if (a.scale, a.dropped) == chosen), None)
    if committed is None:
        return []  # the replay of the rule names it
    base = result.shared_base_sha256
    return [
        f"{_attempt_label(committed)}, {quoted(e.node_id, MAX_PEER_NAME_CHARS)}'s evaluation "
        f"judged {e.state_sha256[:12] or 'a state it did not name'}, not the committed base "
        f"{base[:12]}"
        for e in committed.evaluations
        if e.state_sha256 != base
    ]


def _verdict(attempt: pb.ValidationAttempt) -> Verdict:
    return Verdict(attempt.accepted, tuple(attempt.objections), attempt.reason)


def _droppable(result: pb.ConsortiumRoundResult, policy: AcceptancePolicy) -> list[str]:
    """The contributions the drop-one fallback may leave out, as the round decides them:
    each accepted one whose removal leaves enough for the policy to integrate (none when
    the record cannot say, which its other checks then report)."""
    if not policy.drop_one or not result.HasField("policy"):
        return []
    try:
        weighing = policy_from_proto(result.policy)
    except ValueError:
        return []
    order = [c.node_id for c in result.contributions]
    if any(n not in result.quality_scores for n in order):
        return []
    scores = {n: result.quality_scores[n] for n in order}
    norms = None
    if weighing.needs_delta_norms:
        if any(n not in result.delta_norms for n in order):
            return []
        norms = {n: result.delta_norms[n] for n in order}
    decision = weighing.decide(scores, norms)
    quorum = max(result.validation.quorum, 1)
    return [
        n
        for n in order
        if n in decision.weights
        and decision_without(weighing, decision, scores, norms, n, quorum) is not None
    ]


def _step_problems(attempt: pb.ValidationAttempt, tried: Attempt) -> Iterator[str]:
    if attempt.dropped != tried.dropped:
        yield f"left out {attempt.dropped!r}, the rule tries leaving out {tried.dropped!r}"
    scale, verdict = tried.scale, tried.verdict
    if attempt.scale != scale:
        yield f"scale {attempt.scale}, the rule tries {scale}"
    if attempt.accepted != verdict.accepted:
        yield f"accepted is {attempt.accepted}, the rule says {verdict.accepted} ({verdict.reason})"
    if tuple(attempt.objections) != verdict.objections:
        yield f"objections {list(attempt.objections)}, the rule finds {list(verdict.objections)}"
