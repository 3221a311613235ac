"""Core dataclasses <-> protobuf messages (paired ``x_to_proto`` / ``x_from_proto``).

Weights never ride in these messages: deltas and bases travel as tensor streams
(:mod:`tapestry.wire.tensor_stream`), and a sovereign artifact's weights stay on its node, so
over the wire its ``model_state`` is empty and its digest and size describe it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from google.protobuf import json_format

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium.messages import (
    ConsortiumRoundResult,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.model import ModelSpec
from tapestry.training.consortium.tensors import state_digest


def model_spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(
        architecture=spec.architecture, vocab_size=spec.vocab_size, hidden_size=spec.hidden_size
    )


def model_spec_from_proto(msg: pb.ModelSpec) -> ModelSpec:
    return ModelSpec(msg.architecture, msg.vocab_size, msg.hidden_size)


def artifact_to_proto(artifact: SovereignModelArtifact) -> pb.SovereignModelArtifact:
    return pb.SovereignModelArtifact(
        node_id=artifact.node_id,
        jurisdiction=artifact.jurisdiction,
        stage=artifact.stage,
        model_state_sha256=artifact.model_state_sha256,
        model_state_bytes=artifact.model_state_bytes,
        metrics=dict(artifact.metrics),
        round_num=artifact.round_num,
        stored_at=artifact.stored_at,
    )


def artifact_from_proto(msg: pb.SovereignModelArtifact) -> SovereignModelArtifact:
    """Metadata only: ``model_state`` is empty, the weights stay on the node."""
    return SovereignModelArtifact(
        node_id=msg.node_id,
        jurisdiction=msg.jurisdiction,
        stage=msg.stage,
        model_state={},
        metrics=dict(msg.metrics),
        round_num=msg.round_num,
        model_state_sha256=msg.model_state_sha256,
        model_state_bytes=msg.model_state_bytes,
        stored_at=msg.stored_at,
    )


def contribution_to_proto(
    contribution: SovereignContribution, delta_sha256: str | None = None
) -> pb.SovereignContribution:
    """The header of a contribution; its ``weight_delta`` travels as a tensor stream."""
    if delta_sha256 is None:
        delta_sha256 = contribution.weight_delta_sha256 or (
            state_digest(contribution.weight_delta) if contribution.weight_delta else ""
        )
    return pb.SovereignContribution(
        node_id=contribution.node_id,
        round_num=contribution.round_num,
        weight_delta_sha256=delta_sha256,
        quality_score=contribution.quality_score,
        token_count=contribution.token_count,
        metrics=dict(contribution.metrics),
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


def round_result_to_proto(
    result: ConsortiumRoundResult,
    *,
    previous_base_sha256: str,
    shared_base_sha256: str,
    started_at: float = 0.0,
    finished_at: float = 0.0,
) -> pb.ConsortiumRoundResult:
    """The base states travel as digests (the coordinator computes them once per round).
    Contributions keep the digest their delta had on the wire (the deltas themselves are
    integrated and gone by the time the result is written)."""
    return pb.ConsortiumRoundResult(
        round_num=result.round_num,
        previous_base_sha256=previous_base_sha256,
        shared_base_sha256=shared_base_sha256,
        accepted_nodes=result.accepted_nodes,
        rejected_nodes=result.rejected_nodes,
        contribution_weights=result.contribution_weights,
        rejection_reasons=result.rejection_reasons,
        failed_nodes=result.failed_nodes,
        contributions=[contribution_to_proto(c) for c in result.contributions.values()],
        quality_scores=result.quality_scores,
        started_at=started_at,
        finished_at=finished_at,
    )


def message_to_dict(msg: Any) -> dict[str, Any]:
    """JSON-ready dict with the .proto field names, every field present."""
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def message_to_json(msg: Any) -> str:
    return json_format.MessageToJson(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=2,
        sort_keys=True,
    )


def message_from_json(text: str, message_type: type[Any]) -> Any:
    return json_format.Parse(text, message_type())
