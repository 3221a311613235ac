"""The configs shipped in deploy/local load with the real loaders, agree with each other and
are the ones the docs' "Running your own consortium" (docs/getting-started.md) starts, so
they cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tapestry.config import ConsortiumConfig, NodeConfig, load_config
from tapestry.corpus import load_corpus

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "deploy" / "local"
NODE_FILES = sorted((LOCAL / "nodes").glob("*.toml"))
GETTING_STARTED = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    """The getting-started section under ``## title``, shell line continuations joined."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", GETTING_STARTED, re.S | re.M)
    assert match, f"docs/getting-started.md has no '## {title}' section"
    return match.group(1).replace("\\\n", " ")


def test_three_nodes_are_shipped():
    assert [p.stem for p in NODE_FILES] == ["india", "switzerland", "vietnam"]


@pytest.mark.parametrize("path", NODE_FILES, ids=lambda p: p.stem)
def test_a_shipped_node_config_loads_with_its_corpus(path):
    config = load_config(path, NodeConfig)
    corpus = load_corpus(config.corpus, config.training.max_seq_len)
    assert config.node_id == path.stem
    assert len(corpus) > 0
    assert all(p.is_relative_to(ROOT) for p in config.corpus)  # inside the repository


def test_the_shipped_consortium_names_every_shipped_node_as_it_describes_itself():
    consortium = load_config(LOCAL / "consortium.toml", ConsortiumConfig)
    nodes = {p.stem: load_config(p, NodeConfig) for p in NODE_FILES}
    assert [m.node_id for m in consortium.nodes] == ["vietnam", "switzerland", "india"]
    for member in consortium.nodes:
        node = nodes[member.node_id]
        assert (member.jurisdiction, node.seed, node.consortium_id) == (
            node.jurisdiction,
            consortium.seed,
            consortium.consortium_id,
        )
        # Every node dials the coordinator and takes the model from it.
        assert (member.address, node.model, node.coordinator) == (None, None, "127.0.0.1:50051")


def test_the_docs_start_the_shipped_configs_where_the_consortium_expects_them():
    section = " ".join(_section("Running your own consortium").split())
    consortium = load_config(LOCAL / "consortium.toml", ConsortiumConfig)
    for member in consortium.nodes:
        node = load_config(LOCAL / "nodes" / f"{member.node_id}.toml", NodeConfig)
        assert f"tapestry node serve --config deploy/local/nodes/{member.node_id}.toml" in section
        # The coordinator listens where every node dials it; the nodes listen nowhere.
        assert f"--listen {node.coordinator}" in section
    assert "--listen 127.0.0.1:5006" not in section
    assert "tapestry coordinator serve --config deploy/local/consortium.toml" in section
    for path in re.findall(r"--config (\S+)", section):
        assert (ROOT / path).is_file(), path
    for command in ("round run", "rounds", "artifacts", "nodes", "health --address"):
        assert f"tapestry {command}" in section


def test_the_shipped_configs_use_the_certificates_the_docs_make():
    section = " ".join(_section("Running your own consortium").split())
    certs = LOCAL / "certs"
    consortium = load_config(LOCAL / "consortium.toml", ConsortiumConfig)
    init = re.search(r"tapestry certs init (.*?)(?: #|$)", section)
    assert init, "the docs do not make the certificates"
    assert f"--dir deploy/local/certs --consortium {consortium.consortium_id}" in init.group(1)
    assert consortium.tls is not None
    assert (consortium.tls.ca, consortium.tls.cert, consortium.tls.crl) == (
        certs / "ca.pem",
        certs / "coordinator" / "cert.pem",
        certs / "crl.pem",
    )
    for member in consortium.nodes:
        assert f"{member.node_id}=127.0.0.1" in init.group(1)
        node = load_config(LOCAL / "nodes" / f"{member.node_id}.toml", NodeConfig)
        assert node.tls is not None
        assert node.tls.ca.resolve() == certs / "ca.pem"
        assert node.tls.key.resolve() == certs / "nodes" / member.node_id / "key.pem"
