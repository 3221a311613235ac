"""The coordinator's commit: atomic, resumable, and rolled back when it cannot land."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry.consortium.v1 import journal_pb2 as jpb
from tapestry.coordinator.journal import CoordinatorStore, StoreError
from tapestry.coordinator.servicer import CoordinatorServicer
from tapestry.training.consortium import (
    ConsortiumCoordinator,
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


def _servicer(root: Path) -> tuple[CoordinatorServicer, ConsortiumCoordinator, CoordinatorStore]:
    store = CoordinatorStore(root)
    core = ConsortiumCoordinator(SPEC.build(seed=1), ContributionPolicy())
    store.save_initial_base(core.shared_base_state)
    return CoordinatorServicer(core, _nodes(), store, SPEC), core, store  # type: ignore[arg-type]


def test_a_round_that_cannot_be_committed_is_rolled_back(tmp_path, monkeypatch):
    servicer, core, store = _servicer(tmp_path)
    before = state_digest(core.shared_base_state)

    def disk_full(record, base):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "commit", disk_full)
    with pytest.raises(OSError, match="No space left"):
        servicer._run_round(lambda *_: None)
    assert core.round_num == 0
    assert state_digest(core.shared_base_state) == before
    assert core.sovereign_artifacts == {}
    assert store.latest()[0] == 0  # type: ignore[index]

    monkeypatch.undo()
    record = servicer._run_round(lambda *_: None)
    assert record.result.round_num == 1
    assert record.result.previous_base_sha256 == before
    assert store.latest()[0] == 1  # type: ignore[index]


def test_resume_skips_a_round_whose_base_file_is_damaged(tmp_path):
    servicer, core, store = _servicer(tmp_path)
    first = servicer._run_round(lambda *_: None)
    second = servicer._run_round(lambda *_: None)
    assert store.latest()[0] == 2  # type: ignore[index]

    damaged = tmp_path / "base" / "round-000002.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")
    round_num, base, records = store.latest()  # type: ignore[misc]
    assert round_num == 1
    assert state_digest(base) == first.result.shared_base_sha256
    assert [r.result.round_num for r in records] == [1]
    assert second.result.previous_base_sha256 == first.result.shared_base_sha256


def test_an_unreadable_journal_entry_is_ignored(tmp_path):
    servicer, _, store = _servicer(tmp_path)
    servicer._run_round(lambda *_: None)
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
    servicer, _, store = _servicer(tmp_path)
    record = servicer._run_round(lambda *_: None)
    assert store.records() == [record]
    assert isinstance(store.records()[0], jpb.RoundRecord)
    assert {a.node_id for a in record.result.artifacts} == {"vn", "ch"}


def test_resume_skips_a_truncated_or_missing_base_file(tmp_path):
    servicer, _, store = _servicer(tmp_path)
    servicer._run_round(lambda *_: None)
    servicer._run_round(lambda *_: None)
    servicer._run_round(lambda *_: None)
    (tmp_path / "base" / "round-000003.safetensors").write_bytes(b"\x08\x00")
    assert store.latest()[0] == 2  # type: ignore[index]
    (tmp_path / "base" / "round-000002.safetensors").unlink()
    assert store.latest()[0] == 1  # type: ignore[index]
