"""The held-out split: a seeded rule per document, the same on every run, nothing in both
parts, and every shipped corpus leaves something to train on and something to evaluate on
(issue 9 §2)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from tapestry.config import NodeConfig, TrainingConfig, build_config
from tapestry.corpus import (
    CorpusError,
    heldout_bucket,
    load_node_corpus,
    load_split_corpus,
    read_documents,
    split_documents,
    windows,
)
from tapestry.demo import DEMO_NODES

DOCUMENTS = [f"line {i}: " + "xyz" * (i % 7 + 1) for i in range(400)]


def split(documents: list[str], percent: int = 10, seed: int = 0, node_id: str = "vn"):
    return split_documents(documents, seed=seed, node_id=node_id, heldout_percent=percent)


def test_the_rule_is_the_documented_hash() -> None:
    material = "2026\0vietnam\0Chợ nổi Cái Răng".encode()
    value = int.from_bytes(hashlib.sha256(material).digest()[:8], "big")

    assert heldout_bucket("Chợ nổi Cái Răng", seed=2026, node_id="vietnam") == (value % 100, value)
    training, heldout = split(DOCUMENTS, 10)
    for doc in DOCUMENTS:
        bucket, _ = heldout_bucket(doc, seed=0, node_id="vn")
        assert (doc in heldout) == (bucket < 10)


def test_the_split_is_a_partition_about_the_percentage_asked() -> None:
    training, heldout = split(DOCUMENTS, 10)

    assert sorted(training + heldout) == sorted(DOCUMENTS)
    assert not set(training) & set(heldout)
    assert 20 <= len(heldout) <= 60  # about 10% of 400
    # Each part keeps the documents' own order.
    assert training == [d for d in DOCUMENTS if d in set(training)]
    assert heldout == [d for d in DOCUMENTS if d in set(heldout)]


def test_the_split_depends_on_the_documents_not_their_order_or_neighbours() -> None:
    _, heldout = split(DOCUMENTS, 10)
    shuffled = DOCUMENTS[:]
    random.Random(1).shuffle(shuffled)

    assert sorted(split(shuffled, 10)[1]) == sorted(heldout)
    # Adding documents never moves an existing one across the split.
    _, grown = split(DOCUMENTS + [f"new {i}" for i in range(50)], 10)
    assert set(heldout) <= set(grown)


def test_the_seed_and_the_node_choose_the_split() -> None:
    _, heldout = split(DOCUMENTS, 10)
    assert split(DOCUMENTS, 10, seed=1)[1] != heldout
    assert split(DOCUMENTS, 10, node_id="ch")[1] != heldout
    assert split(DOCUMENTS, 10)[1] == heldout


def test_repeated_documents_are_never_in_both_parts() -> None:
    documents = ["same line"] * 5 + DOCUMENTS[:50] + ["same line"] * 5
    training, heldout = split(documents, 30)
    assert ("same line" in training) != ("same line" in heldout)
    assert documents.count("same line") == (training + heldout).count("same line")


def test_a_small_corpus_still_holds_one_out_and_trains_on_the_rest() -> None:
    three = ["Đồng bằng sông Cửu Long.", "The Mekong delta.", "Nước lên nhanh."]
    training, heldout = split(three, 10)
    assert len(heldout) == 1 and len(training) == 2

    # Nothing drawn: the training document of lowest (bucket, hash) is held out.
    lowest = min(three, key=lambda d: heldout_bucket(d, seed=0, node_id="vn"))
    assert heldout == [lowest]
    # Everything drawn: the held-out document of highest (bucket, hash) trains.
    training, heldout = split(three, 99)
    highest = max(three, key=lambda d: heldout_bucket(d, seed=0, node_id="vn"))
    assert training == [highest] and len(heldout) == 2


def test_one_byte_lines_are_neither_kept_for_evaluation_nor_for_training() -> None:
    """A 1-byte line has no next-token target, so the guarantees skip it."""
    documents = ["a", "b", "c", "Chur", "Lugano"]
    training, heldout = split(documents, 10)
    assert {"Chur", "Lugano"} == {d for d in training + heldout if len(d) > 1}
    assert any(len(d) > 1 for d in training) and any(len(d) > 1 for d in heldout)


def test_zero_percent_holds_nothing_out() -> None:
    assert split(DOCUMENTS, 0) == (DOCUMENTS, [])


@pytest.mark.parametrize("documents", [["only one line"], ["twice", "twice"], ["x", "Chur"]])
def test_a_corpus_that_cannot_be_split_says_how_to_fix_it(documents: list[str]) -> None:
    with pytest.raises(CorpusError) as caught:
        split(documents, 10)
    assert str(caught.value) == (
        "node 'vn': the corpus has 1 distinct line(s) of 2 or more bytes; holding 10% out "
        "needs at least 2 (one to train on, one to evaluate on): add lines, or set "
        "[training] heldout_percent = 0"
    )
    assert split(documents, 0)[1] == []


def test_windows_are_cut_from_each_part_to_max_seq_len(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(DOCUMENTS[:40]) + "\n\n", encoding="utf-8")

    parts = load_split_corpus([corpus], 8, seed=0, node_id="vn", heldout_percent=10)

    training, heldout = split(DOCUMENTS[:40], 10)
    assert parts.training == windows(training, 8)
    assert parts.heldout == windows(heldout, 8)
    assert max(len(s) for s in parts.training + parts.heldout) == 8


def test_heldout_percent_is_a_bounded_training_setting() -> None:
    assert TrainingConfig().heldout_percent == 10
    assert TrainingConfig(heldout_percent=0).heldout_percent == 0
    with pytest.raises(ValueError, match="heldout_percent"):
        TrainingConfig(heldout_percent=51)


@pytest.mark.parametrize("spec", DEMO_NODES, ids=lambda s: s.node_id)
def test_every_demo_corpus_splits_into_training_and_heldout_text(spec) -> None:
    config = build_config(
        NodeConfig,
        {
            "node_id": spec.node_id,
            "jurisdiction": spec.jurisdiction,
            "consortium_id": "tapestry-demo",
            "quality_score": spec.quality_score,
            "corpus": spec.corpus,
            "seed": 2026,  # the demo's
        },
        "test",
    )
    documents = read_documents(spec.corpus)
    text = "".join(documents)

    parts = load_node_corpus(config)

    assert 4_000 <= len(text.encode()) <= 8_000  # several KB, written for the project
    assert len(documents) == len(set(documents)) >= 30  # one document per line
    assert parts.heldout and parts.training
    assert max(len(s) for s in parts.training + parts.heldout) == 128
    heldout_bytes = sum(len(s) for s in parts.heldout)
    assert heldout_bytes + sum(len(s) for s in parts.training) == len(text.encode())
    assert heldout_bytes < 0.25 * len(text.encode())
