"""Core dataclasses <-> protobuf messages: every field crosses, weights only as digests."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
import torch
from google.protobuf import json_format
from google.protobuf.message import Message

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium import (
    ConsortiumRoundResult,
    ContributionPolicy,
    ContributionWeighting,
    CyclePhase,
    CycleProgress,
    ModelSpec,
    RoundEvent,
    RoundStage,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.governance.measured import QualitySource
from tapestry.training.consortium.tensors import state_digest
from tapestry.wire.codec import (
    NODE_PHASES,
    artifact_from_proto,
    artifact_to_proto,
    contribution_from_proto,
    contribution_to_proto,
    cycle_progress_from_proto,
    cycle_result_from_proto,
    cycle_result_to_proto,
    message_from_json,
    message_to_dict,
    message_to_json,
    model_spec_from_proto,
    model_spec_to_proto,
    policy_from_proto,
    policy_to_proto,
    round_event_from_proto,
    round_event_to_proto,
    round_result_to_proto,
    selected_round,
    timestamp_from_proto,
    timestamp_to_proto,
)

# doubles whose shortest decimal form is long: any rounding on the way would show
THIRD = 1 / 3
POINT3 = 0.1 + 0.2
TINY = 5e-324
STARTED = datetime(2026, 11, 25, 12, 0, 0, 125000, tzinfo=UTC)
FINISHED = STARTED + timedelta(seconds=3, microseconds=375001)
POLICY = ContributionPolicy(quality_floor=0.75, max_node_weight=0.5, weighting="equal")


def make_artifact(node_id: str = "vn", round_num: int = 4) -> SovereignModelArtifact:
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    return SovereignModelArtifact(
        node_id=node_id,
        jurisdiction="Vietnam",
        stage="sovereign",
        model_state=weights,
        metrics={"loss": POINT3, "perplexity": THIRD, "tiny": TINY},
        round_num=round_num,
        model_state_sha256=state_digest(weights),
        model_state_bytes=(1 << 40) + 3,  # past 32 bits
        stored_at="/var/lib/tapestry/vn/round-0004.safetensors",
    )


def make_contribution(node_id: str = "vn", round_num: int = 4) -> SovereignContribution:
    return SovereignContribution(
        node_id=node_id,
        round_num=round_num,
        weight_delta={"w": torch.full((2, 3), 0.25), "b": torch.tensor([-0.0])},
        quality_score=0.9 - 1e-12,
        token_count=(1 << 33) + 1,
        metrics={"loss": THIRD, "delta_norm": POINT3},
    )


def make_round_result() -> ConsortiumRoundResult:
    previous, shared = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    return ConsortiumRoundResult(
        round_num=3,
        previous_base_state=previous,
        shared_base_state=shared,
        accepted_nodes=["vn", "ch"],
        rejected_nodes=["in"],
        contribution_weights={"vn": THIRD, "ch": 1 - THIRD},
        rejection_reasons={"in": "quality_score 0.5 below min_quality 0.8"},
        failed_nodes={"br": "UNAVAILABLE: connection refused"},
        contributions={
            "vn": make_contribution("vn", 3),
            "ch": make_contribution("ch", 3),
            "in": make_contribution("in", 3),
        },
        quality_scores={"vn": 0.9, "ch": 0.8, "in": 0.5},
        quality_sources={
            "vn": QualitySource.ASSESSED,
            "ch": QualitySource.SELF_REPORTED,
            "in": QualitySource.SELF_REPORTED,
        },
        artifacts={node: make_artifact(node, 3) for node in ("vn", "ch", "in")},
        policy=POLICY,
        previous_base_sha256=state_digest(previous),
        shared_base_sha256=state_digest(shared),
        started_at=STARTED,
        finished_at=FINISHED,
    )


# ---------------------------------------------------------------------------------------
# Converter pairs
# ---------------------------------------------------------------------------------------


def test_model_spec_round_trips() -> None:
    spec = ModelSpec(architecture="tiny-causal", vocab_size=259, hidden_size=48)
    msg = model_spec_to_proto(spec)
    assert (msg.architecture, msg.vocab_size, msg.hidden_size) == ("tiny-causal", 259, 48)
    assert model_spec_from_proto(msg) == spec
    assert model_spec_from_proto(pb.ModelSpec.FromString(msg.SerializeToString())) == spec


def test_artifact_to_proto_maps_every_metadata_field() -> None:
    artifact = make_artifact()
    msg = artifact_to_proto(artifact)

    assert msg.node_id == "vn"
    assert msg.jurisdiction == "Vietnam"
    assert msg.stage == "sovereign"
    assert msg.model_state_sha256 == state_digest(artifact.model_state)
    assert msg.model_state_bytes == (1 << 40) + 3
    assert dict(msg.metrics) == {"loss": POINT3, "perplexity": THIRD, "tiny": TINY}
    assert msg.round_num == 4
    # Where the node keeps it is the node's business: no path leaves the node.
    assert "stored_at" not in pb.SovereignModelArtifact.DESCRIPTOR.fields_by_name
    assert b"/var/lib/tapestry" not in msg.SerializeToString()


def test_artifact_from_proto_gives_metadata_and_an_empty_model_state() -> None:
    artifact = make_artifact()
    wire = pb.SovereignModelArtifact.FromString(artifact_to_proto(artifact).SerializeToString())

    back = artifact_from_proto(wire)

    assert back.model_state == {}
    assert back.stored_at == ""
    assert back == dataclasses.replace(artifact, model_state={}, stored_at="")
    for field in dataclasses.fields(SovereignModelArtifact):
        if field.name not in ("model_state", "stored_at"):
            assert getattr(back, field.name) == getattr(artifact, field.name), field.name
    assert back.metrics["loss"] == POINT3 and back.metrics["perplexity"] == THIRD
    assert artifact_to_proto(back) == artifact_to_proto(artifact)


def test_contribution_header_round_trips_with_its_delta_digest() -> None:
    contribution = make_contribution()
    msg = contribution_to_proto(contribution)

    assert msg.node_id == "vn"
    assert msg.round_num == 4
    assert msg.weight_delta_sha256 == state_digest(contribution.weight_delta)
    assert msg.quality_score == 0.9 - 1e-12
    assert msg.token_count == (1 << 33) + 1
    assert dict(msg.metrics) == {"loss": THIRD, "delta_norm": POINT3}

    wire = pb.SovereignContribution.FromString(msg.SerializeToString())
    delta = {"w": torch.full((2, 3), 0.25), "b": torch.tensor([-0.0])}
    back = contribution_from_proto(wire, delta)
    assert back.weight_delta is delta
    # The digest the delta had on the wire comes back with it (checked against the stream).
    assert back.weight_delta_sha256 == msg.weight_delta_sha256
    for field in dataclasses.fields(SovereignContribution):
        if field.name not in ("weight_delta", "weight_delta_sha256"):
            assert getattr(back, field.name) == getattr(contribution, field.name), field.name


def test_contribution_digest_given_or_absent() -> None:
    contribution = make_contribution()
    assert contribution_to_proto(contribution, "f" * 64).weight_delta_sha256 == "f" * 64
    assert contribution_to_proto(contribution, "").weight_delta_sha256 == ""
    empty = dataclasses.replace(contribution, weight_delta={})
    assert contribution_to_proto(empty).weight_delta_sha256 == ""
    # A contribution that arrived over the wire keeps its verified digest after its delta
    # has been integrated and dropped.
    integrated = dataclasses.replace(empty, weight_delta_sha256="e" * 64)
    assert contribution_to_proto(integrated).weight_delta_sha256 == "e" * 64


def test_cycle_result_round_trips() -> None:
    result = SovereignCycleResult(artifact=make_artifact(), contribution=make_contribution())
    delta_sha = state_digest(result.contribution.weight_delta)
    msg = cycle_result_to_proto(result, delta_sha)

    assert msg.artifact == artifact_to_proto(result.artifact)
    assert msg.contribution == contribution_to_proto(result.contribution)
    assert msg.contribution.weight_delta_sha256 == delta_sha

    wire = pb.SovereignCycleResult.FromString(msg.SerializeToString())
    back = cycle_result_from_proto(wire, result.contribution.weight_delta)
    assert back.artifact == dataclasses.replace(result.artifact, model_state={}, stored_at="")
    assert back.contribution.weight_delta is result.contribution.weight_delta
    assert back.contribution == dataclasses.replace(
        result.contribution, weight_delta_sha256=delta_sha
    )


def test_round_result_to_proto_maps_every_field() -> None:
    result = make_round_result()

    msg = round_result_to_proto(result)

    assert msg.round_num == 3
    assert msg.previous_base_sha256 == state_digest(result.previous_base_state)
    assert msg.shared_base_sha256 == state_digest(result.shared_base_state)
    assert list(msg.accepted_nodes) == ["vn", "ch"]
    assert list(msg.rejected_nodes) == ["in"]
    assert dict(msg.contribution_weights) == {"vn": THIRD, "ch": 1 - THIRD}
    assert msg.contribution_weights["vn"] == THIRD  # exact double, not a float32
    assert dict(msg.rejection_reasons) == {"in": "quality_score 0.5 below min_quality 0.8"}
    assert dict(msg.failed_nodes) == {"br": "UNAVAILABLE: connection refused"}
    assert dict(msg.quality_scores) == {"vn": 0.9, "ch": 0.8, "in": 0.5}
    assert dict(msg.quality_sources) == {
        "vn": pb.QUALITY_SOURCE_ASSESSED,
        "ch": pb.QUALITY_SOURCE_SELF_REPORTED,
        "in": pb.QUALITY_SOURCE_SELF_REPORTED,
    }
    assert timestamp_from_proto(msg.started_at) == STARTED
    assert timestamp_from_proto(msg.finished_at) == FINISHED
    assert (msg.started_at.seconds, msg.started_at.nanos) == (int(STARTED.timestamp()), 125_000_000)
    assert msg.policy == policy_to_proto(POLICY)
    assert [c.node_id for c in msg.contributions] == ["vn", "ch", "in"]
    for sent, contribution in zip(msg.contributions, result.contributions.values(), strict=True):
        assert sent.round_num == contribution.round_num
        assert sent.quality_score == contribution.quality_score
        assert sent.token_count == contribution.token_count
        assert dict(sent.metrics) == dict(contribution.metrics)
    assert list(msg.artifacts) == [artifact_to_proto(a) for a in result.artifacts.values()]

    wire = pb.ConsortiumRoundResult.FromString(msg.SerializeToString())
    assert wire == msg


def test_round_result_without_times_or_policy_leaves_them_unset() -> None:
    bare = dataclasses.replace(make_round_result(), started_at=None, finished_at=None, policy=None)
    msg = round_result_to_proto(bare)
    assert not msg.HasField("started_at")
    assert not msg.HasField("finished_at")
    assert not msg.HasField("policy")


def test_a_round_that_is_no_rollback_leaves_rolled_back_to_unset() -> None:
    msg = round_result_to_proto(make_round_result())
    assert not msg.HasField("rolled_back_to")


def test_a_rollback_to_the_initial_base_is_told_apart_from_no_rollback() -> None:
    rollback = dataclasses.replace(make_round_result(), rolled_back_to=0)
    msg = pb.ConsortiumRoundResult.FromString(round_result_to_proto(rollback).SerializeToString())
    assert msg.HasField("rolled_back_to") and msg.rolled_back_to == 0


def test_times_must_be_timezone_aware() -> None:
    naive = dataclasses.replace(make_round_result(), finished_at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="finished_at must be a timezone-aware datetime"):
        round_result_to_proto(naive)


def test_timestamps_are_utc_instants() -> None:
    plus_seven = datetime(2026, 11, 25, 19, 0, 0, 125000, tzinfo=timezone(timedelta(hours=7)))
    stamp = timestamp_to_proto(plus_seven)
    assert timestamp_from_proto(stamp) == STARTED.replace(hour=12)
    assert timestamp_from_proto(stamp).tzinfo is UTC
    assert stamp.ToJsonString() == "2026-11-25T12:00:00.125Z"


@pytest.mark.parametrize("weighting", list(ContributionWeighting))
def test_policy_round_trips(weighting: ContributionWeighting) -> None:
    policy = ContributionPolicy(quality_floor=0.1 + 0.2, max_node_weight=THIRD, weighting=weighting)
    msg = pb.ContributionPolicy.FromString(policy_to_proto(policy).SerializeToString())
    assert (msg.quality_floor, msg.max_node_weight) == (POINT3, THIRD)
    assert (
        msg.weighting
        == {
            ContributionWeighting.QUALITY: pb.CONTRIBUTION_WEIGHTING_QUALITY,
            ContributionWeighting.EQUAL: pb.CONTRIBUTION_WEIGHTING_EQUAL,
        }[weighting]
    )
    back = policy_from_proto(msg)
    assert (back.quality_floor, back.max_node_weight, back.weighting) == (
        POINT3,
        THIRD,
        weighting,
    )


@pytest.mark.parametrize(
    "bounds",
    [
        {},
        {"max_quality": 1.0},
        {"max_delta_norm": 12.5, "max_delta_norm_ratio": 10.0},
        {"max_quality": 0.75, "max_delta_norm": THIRD, "max_delta_norm_ratio": 1.5},
    ],
)
def test_policy_bounds_round_trip_and_unset_stays_none(bounds: dict[str, float]) -> None:
    policy = ContributionPolicy(0.5, 0.5, **bounds)
    msg = pb.ContributionPolicy.FromString(policy_to_proto(policy).SerializeToString())
    back = policy_from_proto(msg)
    for name in ("max_quality", "max_delta_norm", "max_delta_norm_ratio"):
        assert msg.HasField(name) is (name in bounds)
        assert getattr(back, name) == bounds.get(name)


def test_policy_from_proto_refuses_what_the_policy_refuses() -> None:
    unset = pb.ContributionPolicy(quality_floor=0.5, max_node_weight=0.5)
    with pytest.raises(
        ValueError,
        match="weighting must be one of CONTRIBUTION_WEIGHTING_QUALITY, "
        "CONTRIBUTION_WEIGHTING_EQUAL; got enum number 0",
    ):
        policy_from_proto(unset)
    over_cap = pb.ContributionPolicy(
        max_node_weight=1.5, weighting=pb.CONTRIBUTION_WEIGHTING_QUALITY
    )
    with pytest.raises(ValueError, match=r"max_node_weight must be in \(0, 1\], got 1.5"):
        policy_from_proto(over_cap)


@pytest.mark.parametrize(
    ("stage", "wire"),
    [
        (RoundStage.NODE_STARTED, pb.ROUND_STAGE_NODE_STARTED),
        (RoundStage.NODE_CONTRIBUTED, pb.ROUND_STAGE_NODE_CONTRIBUTED),
        (RoundStage.NODE_FAILED, pb.ROUND_STAGE_NODE_FAILED),
        (RoundStage.INTEGRATED, pb.ROUND_STAGE_INTEGRATED),
        (RoundStage.COMMITTED, pb.ROUND_STAGE_COMMITTED),
        (RoundStage.ABORTED, pb.ROUND_STAGE_ABORTED),
        (RoundStage.ROLLED_BACK, pb.ROUND_STAGE_ROLLED_BACK),
    ],
)
def test_round_event_round_trips(stage: RoundStage, wire: int) -> None:
    event = RoundEvent(7, stage, "vn" if stage.value.startswith("node") else "", "détail ✓")
    msg = round_event_to_proto(event)
    assert (msg.round_num, msg.stage, msg.node_id, msg.detail) == (
        7,
        wire,
        event.node_id,
        "détail ✓",
    )
    assert round_event_from_proto(pb.RoundProgress.FromString(msg.SerializeToString())) == event


@pytest.mark.parametrize("phase", list(CyclePhase))
def test_a_progress_event_round_trips_with_its_numbers(phase: CyclePhase) -> None:
    progress = (
        CycleProgress(phase, 3, 12, 5.25)
        if phase is CyclePhase.TRAINING
        else CycleProgress(phase, state_bytes=66560, tensor_count=3)
    )
    event = RoundEvent(2, RoundStage.NODE_PROGRESS, "vn", progress.describe(), progress)
    msg = pb.RoundProgress.FromString(round_event_to_proto(event).SerializeToString())
    assert msg.progress.phase == pb.CyclePhase.Value(f"CYCLE_PHASE_{phase.name}")
    assert round_event_from_proto(msg) == event


def test_a_node_may_report_only_its_own_phases_and_numbers_in_range() -> None:
    sent = pb.CycleProgress(phase=pb.CYCLE_PHASE_SENDING_DELTA)
    with pytest.raises(ValueError, match="progress phase must be one of CYCLE_PHASE_BASE_"):
        cycle_progress_from_proto(sent, NODE_PHASES)
    late = pb.CycleProgress(phase=pb.CYCLE_PHASE_TRAINING, step=5, total_steps=4, loss=1.0)
    with pytest.raises(ValueError, match=r"progress step 5 of 4: a step must be in"):
        cycle_progress_from_proto(late)


def test_every_round_stage_has_a_wire_value() -> None:
    sent = {round_event_to_proto(RoundEvent(1, stage)).stage for stage in RoundStage}
    assert sent == set(pb.RoundStage.values()) - {pb.ROUND_STAGE_UNSPECIFIED}


def test_round_event_from_proto_refuses_an_unset_stage() -> None:
    with pytest.raises(ValueError, match="stage must be one of ROUND_STAGE_NODE_STARTED, "):
        round_event_from_proto(pb.RoundProgress(round_num=1))


@pytest.mark.parametrize("request_type", [pb.GetRoundRequest, pb.GetArtifactRequest])
def test_a_request_selects_a_round_or_the_latest_explicitly(request_type: type) -> None:
    assert selected_round(request_type(round_num=4)) == 4
    assert selected_round(request_type(latest=True)) is None
    refusals = [
        (request_type(), "select a round: set round_num (>= 1) or latest=true"),
        (request_type(round_num=0), "round_num must be >= 1 (rounds are numbered from 1); "),
        (request_type(latest=False), "latest must be true when set"),
    ]
    for request, message in refusals:
        with pytest.raises(ValueError) as refused:
            selected_round(request)
        assert str(refused.value).startswith(message)


# ---------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------


def test_message_to_dict_uses_proto_field_names_and_includes_empty_fields() -> None:
    result = dataclasses.replace(
        make_round_result(),
        rejected_nodes=[],
        rejection_reasons={},
        failed_nodes={},
        contributions={},
        artifacts={},
        previous_base_sha256="p" * 64,
        shared_base_sha256="",
    )
    msg = round_result_to_proto(result)

    as_dict = message_to_dict(msg)

    # rolled_back_to and validation have presence: they appear on a rollback (see the next
    # test) and on a validated round only.
    assert set(as_dict) == set(pb.ConsortiumRoundResult.DESCRIPTOR.fields_by_name) - {
        "rolled_back_to",
        "validation",
    }
    assert as_dict["round_num"] == 3
    assert as_dict["accepted_nodes"] == ["vn", "ch"]
    assert as_dict["contribution_weights"] == {"vn": THIRD, "ch": 1 - THIRD}
    assert as_dict["previous_base_sha256"] == "p" * 64
    assert as_dict["shared_base_sha256"] == ""
    assert as_dict["failed_nodes"] == {}
    assert as_dict["rejected_nodes"] == []
    assert as_dict["rejection_reasons"] == {}
    assert as_dict["contributions"] == []
    assert as_dict["artifacts"] == []
    assert as_dict["started_at"] == "2026-11-25T12:00:00.125Z"
    assert as_dict["finished_at"] == "2026-11-25T12:00:03.500001Z"
    assert as_dict["policy"] == {
        "quality_floor": 0.75,
        "max_node_weight": 0.5,
        "weighting": "CONTRIBUTION_WEIGHTING_EQUAL",
        "strategy": "INTEGRATION_STRATEGY_FEDAVG",
    }
    assert "roundNum" not in as_dict and "acceptedNodes" not in as_dict

    artifact = message_to_dict(artifact_to_proto(make_artifact()))
    assert set(artifact) == set(pb.SovereignModelArtifact.DESCRIPTOR.fields_by_name)
    assert artifact["model_state_sha256"] == state_digest(make_artifact().model_state)


def test_a_rollback_to_the_initial_base_shows_in_json_as_zero() -> None:
    rollback = dataclasses.replace(make_round_result(), rolled_back_to=0)
    assert message_to_dict(round_result_to_proto(rollback))["rolled_back_to"] == 0


def test_json_counts_and_sizes_are_numbers_everywhere_they_nest() -> None:
    """proto JSON writes 64-bit integers as strings; people and scripts get numbers."""
    msg = round_result_to_proto(make_round_result())
    assert json_format.MessageToDict(msg)["contributions"][0]["tokenCount"] == str((1 << 33) + 1)

    as_dict = message_to_dict(msg)

    assert [c["token_count"] for c in as_dict["contributions"]] == [(1 << 33) + 1] * 3
    assert [a["model_state_bytes"] for a in as_dict["artifacts"]] == [(1 << 40) + 3] * 3
    chunk = message_to_dict(pb.TensorChunk(shape=[2, 3], offset=1 << 35, total_bytes=7))
    assert (chunk["shape"], chunk["offset"], chunk["total_bytes"]) == ([2, 3], 1 << 35, 7)
    unset = message_to_dict(pb.StateTrailer())
    assert unset == {"tensor_count": 0, "total_bytes": 0, "sha256": ""}
    described = message_to_dict(pb.DescribeResponse(token_count=12, model=pb.ModelSpec()))
    assert described["token_count"] == 12 and described["model"]["vocab_size"] == 0
    page = message_to_dict(pb.ListArtifactsResponse(artifacts=[artifact_to_proto(make_artifact())]))
    assert page["artifacts"][0]["model_state_bytes"] == (1 << 40) + 3
    text = json.dumps(as_dict)
    assert f'"token_count": {(1 << 33) + 1}' in text
    assert '"model_state_bytes": "' not in text


def test_every_quality_source_has_a_wire_value_and_json_names_it() -> None:
    for source in QualitySource:
        result = dataclasses.replace(make_round_result(), quality_sources={"vn": source})
        msg = round_result_to_proto(result)
        assert msg.quality_sources["vn"] != pb.QUALITY_SOURCE_UNSPECIFIED
        named = message_to_dict(msg)["quality_sources"]["vn"]
        assert named == f"QUALITY_SOURCE_{source.name}"


def test_round_record_json_round_trip() -> None:
    result = make_round_result()
    record = pb.RoundRecord(result=round_result_to_proto(result))

    text = message_to_json(record)
    back = message_from_json(text, pb.RoundRecord)

    assert isinstance(back, pb.RoundRecord)
    assert back == record
    assert back.result.contribution_weights["vn"] == THIRD
    assert back.result.artifacts[0].metrics["tiny"] == TINY
    assert back.result.artifacts[0].model_state_bytes == (1 << 40) + 3
    assert timestamp_from_proto(back.result.finished_at) == FINISHED
    assert policy_from_proto(back.result.policy).weighting is ContributionWeighting.EQUAL
    assert message_to_json(back) == text  # stable text: same record, same bytes on disk
    parsed = json.loads(text)
    assert parsed["result"]["shared_base_sha256"] == state_digest(result.shared_base_state)
    assert parsed["result"]["artifacts"][1]["node_id"] == "ch"
    assert "stored_at" not in text


def test_message_from_json_refuses_unknown_fields() -> None:
    with pytest.raises(json_format.ParseError, match='has no field named "bogus"'):
        message_from_json('{"result": {"bogus": 1}}', pb.RoundRecord)


# ---------------------------------------------------------------------------------------
# Every dataclass field has a counterpart on the wire
# ---------------------------------------------------------------------------------------

STATE_FIELDS = {
    "model_state": ("model_state_sha256", "model_state_bytes"),
    "weight_delta": ("weight_delta_sha256",),
    "previous_base_state": ("previous_base_sha256",),
    "shared_base_state": ("shared_base_sha256",),
    "strategy_state": ("outer_momentum_sha256",),
    "stored_at": (),  # node-local: stays on the node
}


@pytest.mark.parametrize(
    ("dataclass", "message"),
    [
        (SovereignModelArtifact, pb.SovereignModelArtifact),
        (SovereignContribution, pb.SovereignContribution),
        (SovereignCycleResult, pb.SovereignCycleResult),
        (ConsortiumRoundResult, pb.ConsortiumRoundResult),
        (RoundEvent, pb.RoundProgress),
        (CycleProgress, pb.CycleProgress),
    ],
    ids=lambda cls: cls.__name__,
)
def test_every_dataclass_field_has_a_proto_counterpart(
    dataclass: type, message: type[Message]
) -> None:
    wire_fields = message.DESCRIPTOR.fields_by_name
    missing = [
        (field.name, counterpart)
        for field in dataclasses.fields(dataclass)
        for counterpart in STATE_FIELDS.get(field.name, (field.name,))
        if counterpart not in wire_fields
    ]
    assert missing == [], f"{dataclass.__name__} fields without a {message.__name__} field"
