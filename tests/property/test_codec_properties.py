"""Hostile messages through the dataclass codec: every ``*_from_proto`` either decodes a
message into a value that encodes back to the same message, or raises a short ValueError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from google.protobuf.message import DecodeError, Message
from hypothesis import given, settings
from hypothesis import strategies as st

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.limits import MAX_ROUND_NUM
from tapestry.wire import codec

from .conftest import MAX_MESSAGE_CHARS, examples

FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, -0.0])
TEXT = st.text(max_size=20) | st.text(min_size=2000, max_size=3000)
UINT32 = st.integers(0, 2**32 - 1)
ROUND = st.integers(0, MAX_ROUND_NUM)  # uint64 on the wire, int64 in value


def decoded(kind: type[Message], raw: bytes) -> Message | None:
    try:
        return kind.FromString(raw)
    except DecodeError:
        return None


def outcome(decode: Callable[[Any], Any], msg: Message) -> Any:
    """The decoded value, or None after a short ValueError; anything else fails the test."""
    try:
        return decode(msg)
    except ValueError as error:
        assert len(str(error)) <= MAX_MESSAGE_CHARS, str(error)[:200]
        return None


POLICIES = st.builds(
    pb.ContributionPolicy,
    quality_floor=FLOATS,
    max_node_weight=FLOATS,
    weighting=st.integers(-3, 5) | st.integers(-(2**31), 2**31 - 1),
    max_quality=st.none() | FLOATS,
    max_delta_norm=st.none() | FLOATS,
    max_delta_norm_ratio=st.none() | FLOATS,
)
CYCLE_PROGRESS = st.builds(
    pb.CycleProgress,
    phase=st.integers(-1, 6),
    step=st.integers(0, 2**64 - 1),
    total_steps=st.integers(0, 2**64 - 1),
    loss=st.none() | FLOATS,
    state_bytes=st.integers(0, 2**64 - 1),
    tensor_count=st.integers(0, 2**32 - 1),
)
PROGRESS = st.builds(
    pb.RoundProgress,
    round_num=ROUND,
    stage=st.integers(-3, 10) | st.integers(-(2**31), 2**31 - 1),
    node_id=TEXT,
    detail=TEXT,
    progress=st.none() | CYCLE_PROGRESS,
)


@settings(max_examples=examples(300))
@given(msg=POLICIES | st.binary(max_size=120).map(lambda b: decoded(pb.ContributionPolicy, b)))
def test_a_policy_decodes_and_encodes_back_or_is_refused_briefly(
    msg: pb.ContributionPolicy | None,
) -> None:
    if msg is None:
        return
    policy = outcome(codec.policy_from_proto, msg)
    if policy is not None:
        again = codec.policy_from_proto(codec.policy_to_proto(policy))
        assert repr(again) == repr(policy)  # the policy has no __eq__; its repr shows every field


@settings(max_examples=examples(300))
@given(msg=PROGRESS | st.binary(max_size=120).map(lambda b: decoded(pb.RoundProgress, b)))
def test_round_progress_decodes_and_encodes_back_or_is_refused_briefly(
    msg: pb.RoundProgress | None,
) -> None:
    if msg is None:
        return
    event = outcome(codec.round_event_from_proto, msg)
    if event is not None:
        again = codec.round_event_to_proto(event)
        assert codec.round_event_from_proto(again) == event


@settings(max_examples=examples(300))
@given(raw=st.binary(max_size=400))
def test_a_round_result_shaped_message_decodes_or_is_refused_briefly(raw: bytes) -> None:
    """Random bytes as a round result: its parts go through the codec's decoders."""
    msg = decoded(pb.ConsortiumRoundResult, raw)
    if msg is None:
        return
    assert isinstance(msg, pb.ConsortiumRoundResult)
    if msg.HasField("policy"):
        outcome(codec.policy_from_proto, msg.policy)
    for artifact in msg.artifacts:
        decoded_artifact = outcome(codec.artifact_from_proto, artifact)
        if decoded_artifact is not None:
            assert codec.artifact_to_proto(decoded_artifact) == artifact
    for contribution in msg.contributions:
        outcome(lambda c: codec.contribution_from_proto(c, {}), contribution)
    for stamp in (msg.started_at, msg.finished_at):
        moment = outcome(codec.timestamp_from_proto, stamp)
        if moment is not None:
            assert codec.timestamp_from_proto(codec.timestamp_to_proto(moment)) == moment


@settings(max_examples=examples(300))
@given(raw=st.binary(max_size=300))
def test_a_cycle_result_decodes_or_is_refused_briefly(raw: bytes) -> None:
    msg = decoded(pb.SovereignCycleResult, raw)
    if msg is None:
        return
    outcome(lambda m: codec.cycle_result_from_proto(m, {"w": torch.zeros(1)}), msg)


@settings(max_examples=examples(300))
@given(
    request=st.one_of(
        st.builds(pb.GetRoundRequest, round_num=ROUND),
        st.builds(pb.GetRoundRequest, latest=st.booleans()),
        st.just(pb.GetRoundRequest()),
    ),
    request_id=TEXT,
)
def test_selectors_and_request_ids_decode_or_are_refused_briefly(
    request: pb.GetRoundRequest, request_id: str
) -> None:
    selected = outcome(codec.selected_round, request)
    if selected is not None:
        assert selected == request.round_num >= 1
    key = outcome(codec.request_id_from_proto, pb.RunRoundRequest(request_id=request_id))
    if key:
        assert key == request_id
