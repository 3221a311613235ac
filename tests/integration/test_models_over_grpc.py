"""The gpt model through real coordinator and node processes: its tied embedding crosses the
wire and the disk once, and a member whose model or state layout differs gets no weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tapestry.atomic_files import load_state
from tapestry.config import NodeConfig, build_config, load_config
from tapestry.coordinator.remote_node import NodeMismatch, RemoteSovereignNode
from tapestry.node.corpus import load_corpus
from tapestry.node.startup import SERVICE_NAME, build_node_server
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    SovereignTrainingNode,
    state_digest,
)
from tapestry.training.consortium.model import GPT_TEST, load_model_state, model_state
from tapestry.training.consortium.tensors import StateLayout, state_layout
from tapestry.wire.grpc_plumbing import mark_serving

from .conftest import POLICY, TRAINING, write_corpora

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


def test_a_tied_gpt_round_over_grpc_equals_the_core_and_stores_the_tie_once(
    consortium_factory,
):
    consortium = consortium_factory(model=GPT, tls=False)
    with consortium.client() as client:
        result = client.run_round()
        _, served = client.get_base()

    assert list(result.accepted_nodes) == NODES and dict(result.failed_nodes) == {}
    assert EMBEDDING in served and HEAD not in served
    # The same seeds, corpora and settings, run by the in-process core.
    seed = consortium.seed
    nodes = []
    for node_id in NODES:
        config = load_config(consortium.node_config_path(node_id), NodeConfig)
        assert config.model.spec() == GPT_TEST
        nodes.append(
            SovereignTrainingNode(
                node_id,
                config.jurisdiction,
                GPT_TEST.build(seed),
                load_corpus(config.corpus, config.training.max_seq_len),
                config.quality_score,
                config.training.local_epochs,
                config.training.lr,
                config.training.batch_size,
                seed=seed,
            )
        )
    core = ConsortiumCoordinator(GPT_TEST.build(seed), ContributionPolicy(**POLICY))
    expected = core.run_round(nodes).shared_base_state
    assert state_digest(served) == state_digest(expected) == result.shared_base_sha256
    # On disk: the coordinator's base and each node's artifact hold the tensor once, and
    # load back into a model that keeps the tie.
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


def test_a_member_of_another_width_is_failed_with_why_and_gets_no_base(
    consortium_factory, tmp_path: Path
):
    with node_server(tmp_path / "wide", "wide", {**GPT, "hidden_size": 48}) as address:
        member = {"node_id": "wide", "jurisdiction": "Wideland", "address": address}
        consortium = consortium_factory(model=GPT, extra_members=[member], tls=False)
        with consortium.client() as client:
            result = client.run_round()

    assert list(result.accepted_nodes) == NODES
    reason = result.failed_nodes["wide"]
    assert "model hidden_size=48 (expected hidden_size=32)" in reason
    # Never sent a base: it trained nothing and keeps no artifact.
    assert not any((tmp_path / "wide" / "wide" / "artifacts").glob("round-*"))


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
