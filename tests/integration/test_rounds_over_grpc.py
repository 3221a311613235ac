"""Rounds through real coordinator and node processes over gRPC on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch

from tapestry.atomic_files import read_json
from tapestry.state_files import load_state
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    ModelSpec,
    state_digest,
)
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy
from tapestry.wire import codec

from .conftest import POLICY, core_node

pytestmark = pytest.mark.slow  # whole consortia of training processes

NODES = ["vietnam", "switzerland", "india"]


def test_round_retains_one_artifact_per_node_on_disk_and_in_listing(shared_consortium):
    with shared_consortium.client() as client:
        result = client.run_round()
        listed = {a.node_id: a for a in client.list_artifacts()}

    assert result.accepted_nodes == NODES
    assert list(result.rejected_nodes) == [] and dict(result.failed_nodes) == {}
    # Deltas were spilled while they waited for the weights, and are gone with the round.
    assert not (shared_consortium.coordinator_data_dir / "spill").exists()
    assert sum(result.contribution_weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert sorted(listed) == sorted(NODES)
    for node_id in NODES:
        folder = (
            shared_consortium.node_data_dir(node_id)
            / "artifacts"
            / (f"round-{result.round_num:06d}")
        )
        state, metadata = load_state(folder / "model.safetensors")
        manifest = read_json(folder / "manifest.json")
        artifact = listed[node_id]
        assert artifact.round_num == result.round_num
        assert artifact.stage == "continued_pretraining"
        assert artifact.model_state_sha256 == state_digest(state) == manifest["model_state_sha256"]
        assert artifact.model_state_bytes == sum(
            t.numel() * t.element_size() for t in state.values()
        )
        assert artifact.metrics["loss"] > 0
        assert metadata["node_id"] == node_id


def test_accepted_round_changes_the_base_and_commits_it(shared_consortium):
    with shared_consortium.client() as client:
        before_round, before = client.get_base()
        result = client.run_round()
        after_round, after = client.get_base()
        listed = client.list_rounds()

    assert after_round == before_round + 1 == result.round_num
    assert result.previous_base_sha256 == state_digest(before)
    assert result.shared_base_sha256 == state_digest(after)
    assert result.previous_base_sha256 != result.shared_base_sha256
    assert [r.round_num for r in listed] == list(range(1, result.round_num + 1))


def test_all_rejected_leaves_the_base_bitwise_identical(consortium_factory):
    consortium = consortium_factory(policy={"quality_floor": 0.95})
    with consortium.client() as client:
        _, before = client.get_base()
        result = client.run_round()
        _, after = client.get_base()

    assert list(result.accepted_nodes) == []
    assert list(result.rejected_nodes) == NODES
    assert "below the floor 0.95" in result.rejection_reasons["vietnam"]
    assert result.previous_base_sha256 == result.shared_base_sha256
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype
        assert torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8))
    # Sovereign artifacts are kept even when the consortium declines the contribution.
    for node_id in NODES:
        assert (
            consortium.node_data_dir(node_id) / "artifacts" / "round-000001" / "model.safetensors"
        ).exists()


def test_services_give_the_in_process_core_bit_for_bit(consortium_factory):
    consortium = consortium_factory()
    with consortium.client() as client:
        served_rounds = [client.run_round() for _ in range(2)]
        _, served = client.get_base()

    # The same seeds, corpora (split as each node splits its own) and settings, run by the
    # in-process core.
    spec, seed = ModelSpec(), consortium.seed
    nodes = [core_node(consortium, node_id, spec) for node_id in NODES]
    # The services validate each candidate by default (no_regression); so does this core.
    core = ConsortiumCoordinator(
        spec.build(seed), ContributionPolicy(**POLICY), min_nodes=2, acceptance=AcceptancePolicy()
    )
    core_rounds = [core.run_round(nodes) for _ in range(2)]
    expected = core.shared_base_state

    assert served.keys() == expected.keys()
    for name in expected:
        assert torch.equal(served[name], expected[name]), name
    assert state_digest(served) == state_digest(expected)
    # And the same held-out numbers and validation, bit for bit.
    for over_grpc, in_process in zip(served_rounds, core_rounds, strict=True):
        assert in_process.validation is not None
        validated = codec.validation_to_proto(in_process.validation)
        served = over_grpc.validation
        for attempt in served.attempts:  # each member signed (with its [tls] key)
            for evaluation in attempt.evaluations:
                assert evaluation.signature.signature, evaluation.node_id
                evaluation.ClearField("signature")
        # A member in-process neither hashes nor signs what it judged.
        for attempt in validated.attempts:
            for evaluation in attempt.evaluations:
                evaluation.state_sha256 = next(
                    e.state_sha256
                    for a in over_grpc.validation.attempts
                    if a.scale == attempt.scale
                    for e in a.evaluations
                    if e.node_id == evaluation.node_id
                )
        assert served == validated
        for c in over_grpc.contributions:
            assert codec.evaluation_from_proto(c.evaluation) == (
                in_process.contributions[c.node_id].evaluation
            )


def test_a_node_that_is_down_is_reported_and_the_round_completes(consortium_factory):
    consortium = consortium_factory()
    consortium.stop_node("switzerland")
    with consortium.client() as client:
        result = client.run_round()

    assert list(result.accepted_nodes) == ["vietnam", "india"]
    assert list(result.failed_nodes) == ["switzerland"]
    assert "UNAVAILABLE" in result.failed_nodes["switzerland"]
    assert sum(result.contribution_weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert result.previous_base_sha256 != result.shared_base_sha256


def test_a_member_that_never_existed_is_reported_failed(consortium_factory):
    consortium = consortium_factory(
        extra_members=[
            {"node_id": "atlantis", "jurisdiction": "Atlantis", "address": "127.0.0.1:1"}
        ]
    )
    with consortium.client() as client:
        result = client.run_round()
    assert list(result.accepted_nodes) == NODES
    assert "UNAVAILABLE" in result.failed_nodes["atlantis"]


def test_a_restarted_coordinator_resumes_at_its_last_committed_round(consortium_factory):
    consortium = consortium_factory()
    with consortium.client() as client:
        first = client.run_round()
        _, base_before = client.get_base()
    consortium.restart_coordinator()
    with consortium.client() as client:
        round_num, base_after = client.get_base()
        listed = client.list_artifacts()
        second = client.run_round()

    assert round_num == 1
    assert state_digest(base_after) == state_digest(base_before) == first.shared_base_sha256
    assert sorted(a.node_id for a in listed) == sorted(NODES)
    assert second.round_num == 2
    assert second.previous_base_sha256 == first.shared_base_sha256


def test_a_node_past_its_deadline_is_reported_and_the_base_is_untouched(consortium_factory):
    consortium = consortium_factory(settings={"node_timeout_s": 0.001})
    with consortium.client() as client:
        _, before = client.get_base()
        result = client.run_round()
        _, after = client.get_base()

    assert sorted(result.failed_nodes) == sorted(NODES)
    assert all("DEADLINE_EXCEEDED" in why for why in result.failed_nodes.values())
    assert list(result.accepted_nodes) == []
    assert state_digest(before) == state_digest(after) == result.shared_base_sha256
