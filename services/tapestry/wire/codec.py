"""Core dataclasses <-> protobuf messages (paired ``x_to_proto`` / ``x_from_proto``).

Weights never ride in these messages: deltas and bases travel as tensor streams
(:mod:`tapestry.wire.tensor_stream`), and a sovereign artifact's weights stay on its node, so
over the wire its ``model_state`` is empty and its digest and size describe it. Where the
node stores an artifact (``stored_at``) is the node's business and never crosses the wire.

JSON for people and scripts (:func:`message_to_dict`) keeps counts and sizes as JSON
numbers; proto JSON for storage (:func:`message_to_json`) is the canonical mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import torch
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import quoted
from tapestry.limits import (
    MAX_REQUEST_ID_CHARS,
    MAX_SIGNATURE_BYTES,
    MAX_SIGNER_CERTIFICATE_BYTES,
)
from tapestry.pki.signing import Signature
from tapestry.training.consortium.governance.acceptance import (
    DEFAULT_HARM_SCALE,
    AcceptancePolicy,
    AcceptanceRule,
    Attempt,
    Validation,
)
from tapestry.training.consortium.governance.checks import progress_problem
from tapestry.training.consortium.governance.measured import QualitySource
from tapestry.training.consortium.governance.policy import ContributionPolicy, ContributionWeighting
from tapestry.training.consortium.messages import (
    HeldOutEvaluation,
    MemberEvaluation,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.progress import CyclePhase, CycleProgress
from tapestry.training.consortium.round.events import RoundEvent, RoundStage
from tapestry.training.consortium.round.result import ConsortiumRoundResult
from tapestry.training.consortium.strategies.settings import (
    IntegrationStrategy,
    OuterOptimizer,
    StrategyName,
)
from tapestry.training.consortium.tensors import StateLayout, state_digest
from tapestry.wire.delta_encoding import DeltaEncoding


def model_spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(
        architecture=spec.architecture,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        n_layers=spec.n_layers,
        n_heads=spec.n_heads,
        context_length=spec.context_length,
        tie_embeddings=spec.tie_embeddings,
        hf_config=spec.hf_config,
    )


def model_spec_from_proto(msg: pb.ModelSpec) -> ModelSpec:
    return ModelSpec(
        msg.architecture,
        msg.vocab_size,
        msg.hidden_size,
        n_layers=msg.n_layers,
        n_heads=msg.n_heads,
        context_length=msg.context_length,
        tie_embeddings=msg.tie_embeddings,
        hf_config=msg.hf_config,
    )


def state_layout_to_proto(layout: StateLayout) -> pb.StateLayout:
    return pb.StateLayout(
        sha256=layout.sha256,
        tensor_count=layout.tensor_count,
        element_count=layout.element_count,
    )


def state_layout_from_proto(msg: pb.StateLayout) -> StateLayout:
    return StateLayout(msg.sha256, msg.tensor_count, msg.element_count)


def artifact_to_proto(artifact: SovereignModelArtifact) -> pb.SovereignModelArtifact:
    """Metadata only: the weights and the node-local ``stored_at`` path stay on the node."""
    return pb.SovereignModelArtifact(
        node_id=artifact.node_id,
        jurisdiction=artifact.jurisdiction,
        stage=artifact.stage,
        model_state_sha256=artifact.model_state_sha256,
        model_state_bytes=artifact.model_state_bytes,
        metrics=dict(artifact.metrics),
        round_num=artifact.round_num,
    )


def artifact_from_proto(msg: pb.SovereignModelArtifact) -> SovereignModelArtifact:
    """Metadata only: ``model_state`` is empty and ``stored_at`` unknown (both on the node)."""
    return SovereignModelArtifact(
        node_id=msg.node_id,
        jurisdiction=msg.jurisdiction,
        stage=msg.stage,
        model_state={},
        metrics=dict(msg.metrics),
        round_num=msg.round_num,
        model_state_sha256=msg.model_state_sha256,
        model_state_bytes=msg.model_state_bytes,
    )


def evaluation_to_proto(evaluation: HeldOutEvaluation) -> pb.HeldOutEvaluation:
    return pb.HeldOutEvaluation(
        base_loss=evaluation.base_loss,
        base_perplexity=evaluation.base_perplexity,
        sovereign_loss=evaluation.sovereign_loss,
        sovereign_perplexity=evaluation.sovereign_perplexity,
        tokens=evaluation.tokens,
    )


def evaluation_from_proto(msg: pb.HeldOutEvaluation) -> HeldOutEvaluation:
    """As sent: the bounds are admission's
    (:func:`~tapestry.training.consortium.governance.checks.evaluation_problem`), which names
    what is wrong."""
    return HeldOutEvaluation(
        base_loss=msg.base_loss,
        base_perplexity=msg.base_perplexity,
        sovereign_loss=msg.sovereign_loss,
        sovereign_perplexity=msg.sovereign_perplexity,
        tokens=msg.tokens,
    )


def contribution_to_proto(
    contribution: SovereignContribution, delta_sha256: str | None = None
) -> pb.SovereignContribution:
    """The header of a contribution; its ``weight_delta`` travels as a tensor stream."""
    if delta_sha256 is None:
        delta_sha256 = contribution.weight_delta_sha256 or (
            state_digest(contribution.weight_delta) if contribution.weight_delta else ""
        )
    evaluation = contribution.evaluation
    return pb.SovereignContribution(
        node_id=contribution.node_id,
        round_num=contribution.round_num,
        weight_delta_sha256=delta_sha256,
        quality_score=contribution.quality_score,
        token_count=contribution.token_count,
        metrics=dict(contribution.metrics),
        evaluation=evaluation_to_proto(evaluation) if evaluation is not None else None,
    )


def contribution_from_proto(
    msg: pb.SovereignContribution, weight_delta: Mapping[str, torch.Tensor]
) -> SovereignContribution:
    return SovereignContribution(
        node_id=msg.node_id,
        round_num=msg.round_num,
        weight_delta=weight_delta,
        quality_score=msg.quality_score,
        token_count=msg.token_count,
        metrics=dict(msg.metrics),
        weight_delta_sha256=msg.weight_delta_sha256,
        evaluation=evaluation_from_proto(msg.evaluation) if msg.HasField("evaluation") else None,
    )


def cycle_result_to_proto(
    result: SovereignCycleResult, delta_sha256: str
) -> pb.SovereignCycleResult:
    return pb.SovereignCycleResult(
        artifact=artifact_to_proto(result.artifact),
        contribution=contribution_to_proto(result.contribution, delta_sha256),
    )


def cycle_result_from_proto(
    msg: pb.SovereignCycleResult, weight_delta: Mapping[str, torch.Tensor]
) -> SovereignCycleResult:
    return SovereignCycleResult(
        artifact=artifact_from_proto(msg.artifact),
        contribution=contribution_from_proto(msg.contribution, weight_delta),
    )


_WEIGHTINGS = {
    ContributionWeighting.QUALITY: pb.CONTRIBUTION_WEIGHTING_QUALITY,
    ContributionWeighting.EQUAL: pb.CONTRIBUTION_WEIGHTING_EQUAL,
}

_QUALITY_SOURCES = {
    QualitySource.SELF_REPORTED: pb.QUALITY_SOURCE_SELF_REPORTED,
    QualitySource.ASSESSED: pb.QUALITY_SOURCE_ASSESSED,
    QualitySource.MEASURED: pb.QUALITY_SOURCE_MEASURED,
    QualitySource.EVALUATED: pb.QUALITY_SOURCE_EVALUATED,
}


_ENCODINGS = {
    DeltaEncoding.FLOAT32: pb.TENSOR_ENCODING_UNSPECIFIED,  # raw: each tensor's own bytes
    DeltaEncoding.BFLOAT16: pb.TENSOR_ENCODING_BFLOAT16,
    DeltaEncoding.FLOAT16: pb.TENSOR_ENCODING_FLOAT16,
    DeltaEncoding.INT8_BLOCK: pb.TENSOR_ENCODING_INT8_BLOCK,
}


def encoding_to_proto(encoding: DeltaEncoding) -> pb.TensorEncoding.ValueType:
    return _ENCODINGS[encoding]


def encoding_from_proto(number: int, field: str = "encoding") -> DeltaEncoding:
    """The encoding a wire number stands for (unset: raw, ``float32``); a number this
    release does not know is a ``ValueError`` naming ``field``."""
    return _lookup(_ENCODINGS, number, field, pb.TensorEncoding.Name)


_STRATEGIES = {
    StrategyName.FEDAVG: pb.INTEGRATION_STRATEGY_FEDAVG,
    StrategyName.DILOCO: pb.INTEGRATION_STRATEGY_DILOCO,
    StrategyName.MEDIAN: pb.INTEGRATION_STRATEGY_MEDIAN,
    StrategyName.TRIMMED_MEAN: pb.INTEGRATION_STRATEGY_TRIMMED_MEAN,
}


def policy_to_proto(policy: ContributionPolicy) -> pb.ContributionPolicy:
    strategy = policy.strategy
    msg = pb.ContributionPolicy(
        quality_floor=policy.quality_floor,
        max_node_weight=policy.max_node_weight,
        weighting=_WEIGHTINGS[policy.weighting],
        max_quality=policy.max_quality,
        max_delta_norm=policy.max_delta_norm,
        max_delta_norm_ratio=policy.max_delta_norm_ratio,
        strategy=_STRATEGIES[strategy.name],
        trim_fraction=strategy.trim_fraction,
        clip_delta_norm=strategy.clip_delta_norm,
    )
    if strategy.outer is not None:
        outer = strategy.outer
        msg.outer.CopyFrom(
            pb.OuterOptimizer(lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov)
        )
    return msg


def strategy_from_proto(msg: pb.ContributionPolicy) -> IntegrationStrategy:
    """The policy's strategy, validated; unset is fedavg (records written before strategies
    were recorded integrated by fedavg, the only rule then)."""
    name = (
        StrategyName.FEDAVG
        if msg.strategy == pb.INTEGRATION_STRATEGY_UNSPECIFIED
        else _lookup(_STRATEGIES, msg.strategy, "strategy", pb.IntegrationStrategy.Name)
    )
    outer = msg.outer if msg.HasField("outer") else None
    return IntegrationStrategy(
        name,
        trim_fraction=msg.trim_fraction if msg.HasField("trim_fraction") else None,
        clip_delta_norm=msg.clip_delta_norm if msg.HasField("clip_delta_norm") else None,
        outer=OuterOptimizer(outer.lr, outer.momentum, outer.nesterov) if outer else None,
    )


def policy_from_proto(msg: pb.ContributionPolicy) -> ContributionPolicy:
    """The policy, validated as the constructor validates it (``ValueError`` otherwise)."""
    weighting = _lookup(_WEIGHTINGS, msg.weighting, "weighting", pb.ContributionWeighting.Name)
    return ContributionPolicy(
        msg.quality_floor,
        msg.max_node_weight,
        weighting,
        max_quality=msg.max_quality if msg.HasField("max_quality") else None,
        max_delta_norm=msg.max_delta_norm if msg.HasField("max_delta_norm") else None,
        max_delta_norm_ratio=(
            msg.max_delta_norm_ratio if msg.HasField("max_delta_norm_ratio") else None
        ),
        strategy=strategy_from_proto(msg),
    )


_STAGES = {
    RoundStage.NODE_STARTED: pb.ROUND_STAGE_NODE_STARTED,
    RoundStage.NODE_CONTRIBUTED: pb.ROUND_STAGE_NODE_CONTRIBUTED,
    RoundStage.NODE_FAILED: pb.ROUND_STAGE_NODE_FAILED,
    RoundStage.INTEGRATED: pb.ROUND_STAGE_INTEGRATED,
    RoundStage.COMMITTED: pb.ROUND_STAGE_COMMITTED,
    RoundStage.ABORTED: pb.ROUND_STAGE_ABORTED,
    RoundStage.ROLLED_BACK: pb.ROUND_STAGE_ROLLED_BACK,
    RoundStage.NODE_PROGRESS: pb.ROUND_STAGE_NODE_PROGRESS,
    RoundStage.VALIDATED: pb.ROUND_STAGE_VALIDATED,
}
_PHASES = {
    CyclePhase.SENDING_BASE: pb.CYCLE_PHASE_SENDING_BASE,
    CyclePhase.BASE_RECEIVED: pb.CYCLE_PHASE_BASE_RECEIVED,
    CyclePhase.TRAINING: pb.CYCLE_PHASE_TRAINING,
    CyclePhase.SENDING_DELTA: pb.CYCLE_PHASE_SENDING_DELTA,
    CyclePhase.DELTA_RECEIVED: pb.CYCLE_PHASE_DELTA_RECEIVED,
}
NODE_PHASES = frozenset({CyclePhase.BASE_RECEIVED, CyclePhase.TRAINING})
"""The phases a node may report itself; the coordinator marks the others."""


def cycle_progress_to_proto(progress: CycleProgress) -> pb.CycleProgress:
    return pb.CycleProgress(
        phase=_PHASES[progress.phase],
        step=progress.step,
        total_steps=progress.total_steps,
        loss=progress.loss,
        state_bytes=progress.state_bytes,
        tensor_count=progress.tensor_count,
        total_bytes=progress.total_bytes,
        bytes_per_s=progress.bytes_per_s,
        resumes=progress.resumes,
    )


def cycle_progress_from_proto(
    msg: pb.CycleProgress, phases: frozenset[CyclePhase] = frozenset(CyclePhase)
) -> CycleProgress:
    """The report, refused (``ValueError``) with a phase outside ``phases`` or numbers out of
    range (:func:`~tapestry.training.consortium.governance.checks.progress_problem`)."""
    allowed = {phase: wire for phase, wire in _PHASES.items() if phase in phases}
    progress = CycleProgress(
        _lookup(allowed, msg.phase, "progress phase", pb.CyclePhase.Name),
        step=msg.step,
        total_steps=msg.total_steps,
        loss=msg.loss if msg.HasField("loss") else None,
        state_bytes=msg.state_bytes,
        tensor_count=msg.tensor_count,
        total_bytes=msg.total_bytes,
        bytes_per_s=msg.bytes_per_s,
        resumes=msg.resumes,
    )
    problem = progress_problem(progress)
    if problem is not None:
        raise ValueError(problem)
    return progress


def round_event_to_proto(event: RoundEvent) -> pb.RoundProgress:
    msg = pb.RoundProgress(
        round_num=event.round_num,
        stage=_STAGES[event.stage],
        node_id=event.node_id,
        detail=event.detail,
    )
    if event.progress is not None:
        msg.progress.CopyFrom(cycle_progress_to_proto(event.progress))
    return msg


def round_event_from_proto(msg: pb.RoundProgress) -> RoundEvent:
    stage = _lookup(_STAGES, msg.stage, "stage", pb.RoundStage.Name)
    progress = cycle_progress_from_proto(msg.progress) if msg.HasField("progress") else None
    return RoundEvent(msg.round_num, stage, msg.node_id, msg.detail, progress)


Member = TypeVar("Member")


def _lookup(
    mapping: Mapping[Member, int], number: int, field: str, name: Callable[[Any], str]
) -> Member:
    """The core value a wire enum number stands for; unset or unknown is a ``ValueError``."""
    for member, wire in mapping.items():
        if wire == number:
            return member
    known = ", ".join(name(w) for w in mapping.values())
    raise ValueError(f"{field} must be one of {known}; got enum number {number}")


def round_result_to_proto(result: ConsortiumRoundResult) -> pb.ConsortiumRoundResult:
    """The base states travel as the result's digests; contributions keep the digest their
    delta had on the wire (the deltas are integrated and gone by the time the result is
    written); artifacts are metadata. Unset times and policy stay unset on the wire. Diloco's
    outer momentum travels as its digest (empty: zeros or none). Each weighed score travels
    with its source."""
    msg = pb.ConsortiumRoundResult(
        round_num=result.round_num,
        previous_base_sha256=result.previous_base_sha256,
        shared_base_sha256=result.shared_base_sha256,
        accepted_nodes=result.accepted_nodes,
        rejected_nodes=result.rejected_nodes,
        contribution_weights=result.contribution_weights,
        rejection_reasons=result.rejection_reasons,
        failed_nodes=result.failed_nodes,
        contributions=[contribution_to_proto(c) for c in result.contributions.values()],
        quality_scores=result.quality_scores,
        quality_sources={n: _QUALITY_SOURCES[s] for n, s in result.quality_sources.items()},
        delta_norms=result.delta_norms,
        artifacts=[artifact_to_proto(a) for a in result.artifacts.values()],
        aborted_reason=result.aborted_reason,
        rolled_back_to=result.rolled_back_to,
        outer_momentum_sha256=(
            state_digest(result.strategy_state) if result.strategy_state is not None else ""
        ),
    )
    if result.started_at is not None:
        msg.started_at.CopyFrom(timestamp_to_proto(result.started_at, "started_at"))
    if result.finished_at is not None:
        msg.finished_at.CopyFrom(timestamp_to_proto(result.finished_at, "finished_at"))
    if result.policy is not None:
        msg.policy.CopyFrom(policy_to_proto(result.policy))
    if result.validation is not None:
        msg.validation.CopyFrom(validation_to_proto(result.validation))
    return msg


def validation_to_proto(validation: Validation) -> pb.RoundValidation:
    """A round's member validation: its rule, each step tried with the members' numbers."""
    policy = validation.policy
    msg = pb.RoundValidation(
        rule=policy.rule.value,
        tolerance=policy.tolerance,
        max_halvings=policy.max_halvings,
        attempts=[attempt_to_proto(attempt) for attempt in validation.attempts],
        committed_over=validation.committed_over,
        reason=validation.reason,
        quorum=validation.quorum,
        drop_one=policy.drop_one,
        dropped=validation.dropped,
        measure=policy.measure,
        probes=[attempt_to_proto(probe) for probe in validation.probes],
        harm_scale=policy.harm_scale if policy.measure else 0.0,
    )
    if validation.scale is not None:
        msg.committed_scale = validation.scale
    return msg


def attempt_to_proto(attempt: Attempt) -> pb.ValidationAttempt:
    """One candidate tried (or probed), its verdict and the members' evaluations of it."""
    return pb.ValidationAttempt(
        scale=attempt.scale,
        accepted=attempt.verdict.accepted,
        objections=attempt.verdict.objections,
        reason=attempt.verdict.reason,
        evaluations=[member_evaluation_to_proto(e) for e in attempt.evaluations],
        dropped=attempt.dropped,
    )


def member_evaluation_to_proto(evaluation: MemberEvaluation) -> pb.MemberEvaluation:
    """One member's evaluation of a step toward a round's candidate."""
    msg = pb.MemberEvaluation(
        node_id=evaluation.node_id,
        base_loss=evaluation.base_loss,
        candidate_loss=evaluation.candidate_loss,
        state_sha256=evaluation.state_sha256,
    )
    if evaluation.signature:
        msg.signature.ParseFromString(evaluation.signature)
    return msg


def member_evaluation_from_proto(msg: pb.MemberEvaluation) -> MemberEvaluation:
    """A peer's evaluation, checked: losses in [0, MAX_HELDOUT_LOSS] and finite, a digest
    that is one (64 lowercase hex digits) or empty; ``ValueError`` naming what is wrong,
    never the unbounded text itself. Whose it is, the caller checks."""
    digest = msg.state_sha256
    if digest and (len(digest) != 64 or digest.strip("0123456789abcdef")):
        raise ValueError(f"state_sha256 {quoted(digest)} is not a SHA-256 digest")
    signed = msg.signature
    if signed.ByteSize() > MAX_SIGNER_CERTIFICATE_BYTES + MAX_SIGNATURE_BYTES + 16:
        raise ValueError(f"its signature is {signed.ByteSize()} bytes, past any signature's")
    signature = signed.SerializeToString() if msg.HasField("signature") else b""
    return MemberEvaluation(msg.node_id, msg.base_loss, msg.candidate_loss, digest, signature)


def acceptance_policy_from_proto(msg: pb.RoundValidation) -> AcceptancePolicy:
    """The acceptance rule a round's validation was decided by; ``ValueError`` for a rule
    or setting out of range (:class:`AcceptancePolicy` checks them)."""
    try:
        rule = AcceptanceRule(msg.rule)
    except ValueError:
        known = ", ".join(r.value for r in AcceptanceRule)
        raise ValueError(f"validation rule must be one of {known}; got {msg.rule!r}") from None
    harm_scale = msg.harm_scale if msg.measure else DEFAULT_HARM_SCALE
    return AcceptancePolicy(
        rule, msg.tolerance, msg.max_halvings, msg.drop_one, msg.measure, harm_scale
    )


def member_evaluations_from_proto(msg: pb.ValidationAttempt) -> tuple[MemberEvaluation, ...]:
    """The members' evaluations of one step tried, as the rule judged them."""
    return tuple(
        MemberEvaluation(e.node_id, e.base_loss, e.candidate_loss, e.state_sha256)
        for e in msg.evaluations
    )


def signature_to_proto(signature: Signature) -> pb.Signature:
    return pb.Signature(certificate=signature.certificate, signature=signature.signature)


def signature_from_proto(msg: pb.Signature) -> Signature:
    return Signature(certificate=msg.certificate, signature=msg.signature)


def timestamp_to_proto(moment: datetime, field: str = "time") -> Timestamp:
    """A timezone-aware datetime as a Timestamp (a naive one is refused: which zone?)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{field} must be a timezone-aware datetime (UTC), got naive {moment}")
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def timestamp_from_proto(stamp: Timestamp) -> datetime:
    """The Timestamp as a timezone-aware UTC datetime."""
    return stamp.ToDatetime(tzinfo=UTC)


def selected_round(request: pb.GetRoundRequest | pb.GetArtifactRequest) -> int | None:
    """The round number a request selects, or ``None`` for the latest; anything else (no
    selection, round 0, ``latest=false``) is a ``ValueError`` saying what to send."""
    which = request.WhichOneof("selector")
    if which == "latest":
        if not request.latest:
            raise ValueError("latest must be true when set; to select a round, set round_num")
        return None
    if which == "round_num":
        if request.round_num < 1:
            raise ValueError(
                "round_num must be >= 1 (rounds are numbered from 1); "
                "to select the newest, set latest=true instead"
            )
        return request.round_num
    raise ValueError("select a round: set round_num (>= 1) or latest=true")


def request_id_from_proto(request: pb.RunRoundRequest) -> str:
    """The request's idempotency key (``""``: none). Anything but 1 to
    :data:`MAX_REQUEST_ID_CHARS` printable ASCII characters without spaces is a
    ``ValueError`` that describes the id without echoing it."""
    request_id = request.request_id
    if not request_id:
        return ""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise ValueError(
            f"request_id is {len(request_id)} characters long; at most "
            f"MAX_REQUEST_ID_CHARS = {MAX_REQUEST_ID_CHARS} are allowed (send a UUID)"
        )
    if not all("!" <= char <= "~" for char in request_id):
        raise ValueError(
            "request_id must be printable ASCII without spaces or control characters (send a UUID)"
        )
    return request_id


# -- JSON ------------------------------------------------------------------------------

_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_to_dict(msg: Any) -> dict[str, Any]:
    """JSON-ready dict with the .proto field names and every field present, where counts and
    sizes are numbers: proto JSON writes 64-bit integers as strings (for JavaScript's
    doubles), which only surprises people and scripts; ours stay far below 2**53.
    Timestamps stay RFC 3339 strings ("2026-01-02T03:04:05.678Z")."""
    as_dict = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64s_as_numbers(msg.DESCRIPTOR, as_dict)
    return as_dict


def _int64s_as_numbers(descriptor: Descriptor, as_dict: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in as_dict:
            continue
        value = as_dict[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                value[key] = _numbers(value_field, item)
        elif field.is_repeated:
            as_dict[field.name] = [_numbers(field, item) for item in value]
        else:
            as_dict[field.name] = _numbers(field, value)


def _numbers(field: FieldDescriptor, value: Any) -> Any:
    if field.type in _INT64_TYPES:
        return int(value)
    message_type = field.message_type
    # Well-known types (Timestamp, ...) have their own JSON forms: left as they are.
    if message_type is not None and not message_type.full_name.startswith("google.protobuf."):
        _int64s_as_numbers(message_type, value)
    return value


def message_to_json(msg: Any) -> str:
    """Canonical proto JSON (64-bit integers as strings), stable text: used for storage."""
    return json_format.MessageToJson(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=2,
        sort_keys=True,
    )


def message_from_json(text: str, message_type: type[Any]) -> Any:
    return json_format.Parse(text, message_type())
