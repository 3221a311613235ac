"""The coordinator's journal as the core's commit step: atomic, resumable, and a round that
cannot land leaves both the journal and the core as they were."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator import journal
from tapestry.coordinator.journal import CoordinatorStore, StoreError
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ConsortiumRoundResult,
    ContributionPolicy,
    ModelSpec,
    SovereignTrainingNode,
    state_digest,
)

SPEC = ModelSpec(hidden_size=4)


def _nodes() -> list[SovereignTrainingNode]:
    model = SPEC.build(seed=0)
    return [
        SovereignTrainingNode(n, n.title(), model, [list(f"{n} text".encode())], 0.9, 1, seed=5)
        for n in ("vn", "ch")
    ]


class Consortium:
    """The core with the journal as its commit step, as the coordinator service wires it."""

    def __init__(self, root: Path) -> None:
        self.store = CoordinatorStore(root)
        self.core = ConsortiumCoordinator(SPEC.build(seed=1), ContributionPolicy())
        self.store.save_initial_base(self.core.shared_base_state)
        self.records: list[pb.RoundRecord] = []

    def run_round(self) -> pb.RoundRecord:
        self.core.run_round(_nodes(), commit=self._commit)
        return self.records[-1]

    def _commit(self, result: ConsortiumRoundResult) -> None:
        self.records.append(self.store.commit_round(result))


def test_a_round_that_cannot_be_committed_leaves_journal_and_core_as_they_were(
    tmp_path, monkeypatch
):
    consortium = Consortium(tmp_path)
    core, store = consortium.core, consortium.store
    before = state_digest(core.shared_base_state)

    def disk_full(record, base):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "commit", disk_full)
    with pytest.raises(OSError, match="No space left"):
        consortium.run_round()
    assert core.round_num == 0
    assert state_digest(core.shared_base_state) == before
    assert core.sovereign_artifacts == {}
    assert store.latest()[0] == 0  # type: ignore[index]

    monkeypatch.undo()
    record = consortium.run_round()
    assert record.result.round_num == 1
    assert record.result.previous_base_sha256 == before
    assert store.latest()[0] == 1  # type: ignore[index]


def test_a_journal_entry_that_cannot_be_written_commits_nothing(tmp_path, monkeypatch):
    """The base file lands first; without its journal entry the round did not happen."""
    consortium = Consortium(tmp_path)

    def no_entry(path, text):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(journal, "write_text", no_entry)
    with pytest.raises(OSError, match="Input/output error"):
        consortium.run_round()
    monkeypatch.undo()

    assert consortium.core.round_num == 0
    assert consortium.store.latest()[0] == 0  # type: ignore[index]
    assert consortium.run_round().result.round_num == 1


def test_resume_skips_a_round_whose_base_file_is_damaged(tmp_path):
    consortium = Consortium(tmp_path)
    store = consortium.store
    first = consortium.run_round()
    second = consortium.run_round()
    assert store.latest()[0] == 2  # type: ignore[index]

    damaged = tmp_path / "base" / "round-000002.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")
    round_num, base, records = store.latest()  # type: ignore[misc]
    assert round_num == 1
    assert state_digest(base) == first.result.shared_base_sha256
    assert [r.result.round_num for r in records] == [1]
    assert second.result.previous_base_sha256 == first.result.shared_base_sha256


def test_an_unreadable_journal_entry_is_ignored(tmp_path):
    consortium = Consortium(tmp_path)
    store = consortium.store
    consortium.run_round()
    (tmp_path / "rounds" / "round-000002.json").write_text("{ not json")
    round_num, _, records = store.latest()  # type: ignore[misc]
    assert round_num == 1 and len(records) == 1


def test_a_data_dir_of_another_consortium_is_refused(tmp_path):
    store = CoordinatorStore(tmp_path)
    store.check_identity({"consortium_id": "a", "seed": 1})
    store.check_identity({"consortium_id": "a", "seed": 1})
    with pytest.raises(StoreError, match="not of this configuration"):
        store.check_identity({"consortium_id": "b", "seed": 1})


def test_the_journal_holds_each_rounds_record(tmp_path):
    consortium = Consortium(tmp_path)
    store = consortium.store
    record = consortium.run_round()
    assert store.records() == [record]
    assert isinstance(store.records()[0], pb.RoundRecord)
    assert {a.node_id for a in record.result.artifacts} == {"vn", "ch"}


def test_resume_skips_a_truncated_or_missing_base_file(tmp_path):
    consortium = Consortium(tmp_path)
    store = consortium.store
    for _ in range(3):
        consortium.run_round()
    (tmp_path / "base" / "round-000003.safetensors").write_bytes(b"\x08\x00")
    assert store.latest()[0] == 2  # type: ignore[index]
    (tmp_path / "base" / "round-000002.safetensors").unlink()
    assert store.latest()[0] == 1  # type: ignore[index]
