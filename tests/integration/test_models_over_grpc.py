"""The gpt model through real coordinator and node processes: its tied embedding crosses the
wire and the disk once, and a member whose model or state layout differs gets no weights."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tapestry.config import NodeConfig, build_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.remote_node import NodeMismatch, RemoteSovereignNode
from tapestry.demo.launcher import LocalConsortium
from tapestry.node.startup import SERVICE_NAME, build_node_server
from tapestry.state_files import load_state
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    ModelSpec,
    ModelState,
    state_digest,
)
from tapestry.training.consortium.models.spec import GPT_TEST
from tapestry.training.consortium.models.state import load_model_state, model_state
from tapestry.training.consortium.tensors import StateLayout, state_layout
from tapestry.wire.grpc_plumbing import mark_serving

from .conftest import POLICY, TRAINING, core_node, node_specs, write_corpora
from .fake_nodes import FakeNode, serve

pytestmark = pytest.mark.slow  # whole consortia of training processes

NODES = ["vietnam", "switzerland", "india"]
GPT = {
    "architecture": "gpt",
    "hidden_size": GPT_TEST.hidden_size,
    "n_layers": GPT_TEST.n_layers,
    "n_heads": GPT_TEST.n_heads,
    "context_length": GPT_TEST.context_length,
}
EMBEDDING, HEAD = "token_embedding.weight", "lm_head.weight"


def stored_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())  # noqa: SIM118 - a method, not a dict


@contextmanager
def node_server(root: Path, node_id: str, model: dict[str, object]) -> Iterator[str]:
    """A real node server in this process, plaintext on a free port; yields its address."""
    corpus = write_corpora(root)["india"]
    config = build_config(
        NodeConfig,
        {
            "node_id": node_id,
            "jurisdiction": "Wideland",
            "consortium_id": "tapestry-local",
            "quality_score": 0.9,
            "corpus": [str(corpus)],
            "model": model,
            "training": TRAINING,
        },
        "test",
    )
    server, port, health = build_node_server(config, "127.0.0.1:0", root / node_id, insecure=True)
    server.start()
    mark_serving(health, [SERVICE_NAME])
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@dataclass
class GptRound:
    consortium: LocalConsortium
    result: pb.ConsortiumRoundResult
    served: ModelState
    wide_data_dir: Path


@pytest.fixture(scope="module")
def gpt_round(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GptRound]:
    """One round of a test-size tied gpt over three nodes, with one more member ("wide")
    whose node trains a gpt of another width: starting the processes is most of the cost,
    so the tests below share it."""
    root = tmp_path_factory.mktemp("gpt")
    with node_server(root / "wide", "wide", {**GPT, "hidden_size": 48}) as address:
        member = {"node_id": "wide", "jurisdiction": "Wideland", "address": address}
        consortium = LocalConsortium(
            root, node_specs(root), policy=POLICY, model=GPT, extra_members=[member], tls=False
        )
        try:
            consortium.start()
            with consortium.client() as client:
                result = client.run_round()
                _, served = client.get_base()
            yield GptRound(consortium, result, served, root / "wide" / "wide")
        finally:
            consortium.stop()


def test_a_tied_gpt_round_over_grpc_equals_the_core_and_stores_the_tie_once(gpt_round):
    consortium, result, served = gpt_round.consortium, gpt_round.result, gpt_round.served

    assert list(result.accepted_nodes) == NODES
    assert EMBEDDING in served and HEAD not in served
    # The same seeds, corpora and settings, run by the in-process core.
    seed = consortium.seed
    nodes = [core_node(consortium, node_id, GPT_TEST) for node_id in NODES]
    core = ConsortiumCoordinator(GPT_TEST.build(seed), ContributionPolicy(**POLICY))
    expected = core.run_round(nodes).shared_base_state
    assert state_digest(served) == state_digest(expected) == result.shared_base_sha256
    # On disk: the coordinator's base and a node's artifact hold the tensor once, and load
    # back into a model that keeps the tie.
    base_file = consortium.coordinator_data_dir / "base" / "round-000001.safetensors"
    artifact = (
        consortium.node_data_dir("india") / "artifacts" / "round-000001" / "model.safetensors"
    )
    for path in (base_file, artifact):
        assert EMBEDDING in stored_keys(path) and HEAD not in stored_keys(path)
        state, _ = load_state(path)
        model = GPT_TEST.build(0)
        load_model_state(model, state)
        assert model.lm_head.weight is model.token_embedding.weight
        assert torch.equal(model.lm_head.weight.detach(), state[EMBEDDING])


def test_a_member_of_another_width_is_failed_with_why_and_gets_no_base(gpt_round):
    failed = dict(gpt_round.result.failed_nodes)

    assert list(failed) == ["wide"]
    assert "model hidden_size=48 (expected hidden_size=32)" in failed["wide"]
    # One cause, said once: the differing spec explains the differing layout.
    assert "state layout" not in failed["wide"] and "another release" not in failed["wide"]
    # Never sent a base: it trained nothing and keeps no artifact.
    assert not any((gpt_round.wide_data_dir / "artifacts").glob("round-*"))


def test_a_member_whose_state_layout_differs_is_refused_before_any_weights(tmp_path: Path):
    with node_server(tmp_path, "vietnam", GPT) as address:
        ours = state_layout(model_state(GPT_TEST.build(0)))
        matching = RemoteSovereignNode(
            "vietnam", "Wideland", address, model=GPT_TEST, state_layout=ours
        )
        other = StateLayout("0" * 64, ours.tensor_count + 1, ours.element_count)
        differing = RemoteSovereignNode(
            "vietnam", "Wideland", address, model=GPT_TEST, state_layout=other
        )
        try:
            matching.check_identity()
            with pytest.raises(NodeMismatch) as refused:
                differing.run_sovereign_cycle(1, model_state(GPT_TEST.build(0)))
        finally:
            matching.close()
            differing.close()

    assert f"state layout {ours}, expected {other}" in str(refused.value)
    assert not any((tmp_path / "vietnam" / "artifacts").glob("round-*"))


class NodeWithoutLayout(FakeNode):
    """A node of an earlier release: its Describe says nothing of its state layout."""

    def Describe(self, request, context):  # noqa: N802
        described = super().Describe(request, context)
        described.ClearField("state_layout")
        return described


def test_a_member_that_describes_no_state_layout_is_refused():
    node = NodeWithoutLayout("vietnam", jurisdiction="Vietnam")
    ours = state_layout(model_state(ModelSpec().build(0)))
    with serve([node]) as (member,):
        remote = RemoteSovereignNode(
            "vietnam", "Vietnam", member["address"], model=ModelSpec(), state_layout=ours
        )
        try:
            with pytest.raises(NodeMismatch, match=re.escape(f"no state layout, expected {ours}")):
                remote.run_sovereign_cycle(1, model_state(ModelSpec().build(0)))
        finally:
            remote.close()

    assert node.cycles == 0
