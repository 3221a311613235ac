"""Fixtures that run real servers: every process on 127.0.0.1, on ports chosen at bind time,
and every one stopped when its fixture ends."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tapestry.config import ConsortiumConfig, NodeConfig, load_config
from tapestry.corpus import load_node_corpus
from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec
from tapestry.training.consortium import ModelSpec, SovereignTrainingNode

# Written for these tests: distinct per node, so their deltas differ.
CORPORA = {
    "vietnam": [
        "Đồng bằng sông Cửu Long trồng lúa hai vụ mỗi năm.",
        "The Mekong delta co-operative shared rainfall logs with the district clinic.",
        "Nước lên nhanh vào tháng chín; thuyền chở gạo về chợ nổi.",
    ],
    "switzerland": [
        "Die Gemeinde stimmt am Sonntag über den neuen Wasserzins ab.",
        "Le train de 7 h 02 relie Lausanne à Brigue en une heure quarante.",
        "Il rifugio alpino riapre quando la neve lascia libero il sentiero.",
    ],
    "india": [
        "मानसून की पहली बारिश के साथ किसान बुवाई शुरू करते हैं।",
        "The district portal issues land records in Tamil, Hindi and English.",
        "சென்னையில் இன்று மாலை இடியுடன் கூடிய மழை பெய்யும்.",
    ],
}
JURISDICTIONS = {"vietnam": "Vietnam", "switzerland": "Switzerland", "india": "India"}
SCORES = {"vietnam": 0.90, "switzerland": 0.86, "india": 0.88}
TRAINING = {"local_epochs": 2, "lr": 0.01, "batch_size": 2, "max_seq_len": 64}
POLICY = {"quality_floor": 0.75, "max_node_weight": 0.5, "weighting": "quality"}


def write_corpora(root: Path) -> dict[str, Path]:
    paths = {}
    for node_id, lines in CORPORA.items():
        path = root / "corpora" / f"{node_id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[node_id] = path
    return paths


def node_specs(root: Path, scores: dict[str, float] | None = None) -> list[LocalNodeSpec]:
    corpora = write_corpora(root)
    scores = scores or SCORES
    return [
        LocalNodeSpec(
            node_id, JURISDICTIONS[node_id], scores[node_id], [corpora[node_id]], dict(TRAINING)
        )
        for node_id in CORPORA
    ]


@pytest.fixture
def consortium_factory(tmp_path: Path) -> Iterator:
    """Start a LocalConsortium on demand; all of them are stopped at the end of the test."""
    started: list[LocalConsortium] = []

    def start(
        name: str = "c",
        scores: dict[str, float] | None = None,
        policy: dict | None = None,
        **kwargs: object,
    ) -> LocalConsortium:
        root = tmp_path / name
        consortium = LocalConsortium(
            root, node_specs(root, scores), policy=policy or POLICY, **kwargs
        )  # type: ignore[arg-type]
        started.append(consortium)
        consortium.start()
        return consortium

    yield start
    for consortium in started:
        consortium.stop()


@pytest.fixture(scope="module")
def shared_consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalConsortium]:
    """One consortium for the read-mostly tests of a module (starting four processes costs
    a few seconds); its nodes dial out."""
    root = tmp_path_factory.mktemp("shared")
    consortium = LocalConsortium(root, node_specs(root), policy=POLICY)
    try:
        consortium.start()
        yield consortium
    finally:
        consortium.stop()


@pytest.fixture(scope="module")
def listening_consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalConsortium]:
    """Like :func:`shared_consortium`, its nodes listening (the coordinator dials them), for
    the tests that call a node's own port, as a coordinator or a stranger would."""
    root = tmp_path_factory.mktemp("listening")
    consortium = LocalConsortium(root, node_specs(root), policy=POLICY, dial_out=False)
    try:
        consortium.start()
        yield consortium
    finally:
        consortium.stop()


def core_node(consortium: LocalConsortium, node_id: str, spec: ModelSpec) -> SovereignTrainingNode:
    """The in-process core's twin of ``consortium``'s node ``node_id``: its seed, its
    corpus split as the node splits it, its training settings, and ``spec`` (checked
    against its file), so the twin's cycles give the node process's bits."""
    config = load_config(consortium.node_config_path(node_id), NodeConfig)
    # The node's model: its file's (a node that listens) or the coordinator's (one that
    # dials out takes it from the consortium file, through its session).
    assert (
        config.model or load_config(consortium.consortium_config_path, ConsortiumConfig).model
    ) == spec
    corpus = load_node_corpus(config)
    return SovereignTrainingNode(
        node_id,
        config.jurisdiction,
        spec.build(consortium.seed),
        corpus.training,
        config.quality_score,
        config.training.local_epochs,
        config.training.lr,
        config.training.batch_size,
        seed=consortium.seed,
        heldout_corpus=corpus.heldout,
    )


def round_run(consortium: LocalConsortium, *args: str) -> subprocess.CompletedProcess[str]:
    """`tapestry round run` against ``consortium``'s coordinator, as its operator."""
    return subprocess.run(
        [sys.executable, "-m", "tapestry", "round", "run",
         "--coordinator", consortium.coordinator_address, *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, **consortium.cli_env()},
    )  # fmt: skip
