"""A store opened after a crash (a node's artifacts, the coordinator's base and journal)
clears what interrupted writes left behind and keeps everything complete as it was."""

from __future__ import annotations

from pathlib import Path

import torch

from tapestry.atomic_files import write_json
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.node.artifacts import ArtifactStore
from tapestry.state_files import load_state
from tapestry.training.consortium import SovereignModelArtifact, state_digest


def artifact(round_num: int, value: float) -> SovereignModelArtifact:
    state = {"w": torch.full((4,), value)}
    return SovereignModelArtifact(
        "vn",
        "Vietnam",
        "continued_pretraining",
        state,
        {"loss": value},
        round_num=round_num,
        model_state_sha256=state_digest(state),
        model_state_bytes=16,
    )


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_reopened_store_clears_interrupted_writes_and_keeps_complete_artifacts(
    tmp_path: Path,
) -> None:
    store = ArtifactStore(tmp_path)
    store.save(artifact(1, 1.0))
    first_of_2 = store.save(artifact(2, 2.0))
    store.save(artifact(2, 3.0))  # sets the first one aside
    aside = f"round-000002.superseded-{first_of_2.model_state_sha256[:16]}"
    complete = tree(tmp_path)
    root = tmp_path / "artifacts"
    # What a SIGKILL can leave, one per step of a save:
    (root / "round-000001" / ".model.safetensors.tmp").write_bytes(b"half a model")
    (root / "round-000002" / ".manifest.json.tmp").write_text("{")
    (root / "round-000002" / ".tmpAb12Cd").write_bytes(b"safetensors' own temporary")
    (root / ".superseded.json.tmp").write_text("{")
    (root / "round-000003").mkdir()  # model written, manifest not yet
    (root / "round-000003" / "model.safetensors").write_bytes(b"a model without manifest")
    (root / "round-000004").mkdir()  # killed inside the model's write
    (root / "round-000004" / ".model.safetensors.tmp").write_bytes(b"half")
    write_json(root / "round-000001" / "superseded.json", {"sequence": 9})  # before its rename
    (root / ".deleting-round-000002.superseded-0123456789abcdef").mkdir()  # half deleted
    (root / ".deleting-round-000002.superseded-0123456789abcdef" / "manifest.json").write_text("{}")

    reopened = ArtifactStore(tmp_path)

    assert tree(tmp_path) == complete
    assert reopened.rounds() == [1, 2]
    assert [p.name for p in reopened.superseded()] == [aside]
    for round_num in (1, 2):
        stored = reopened.get(round_num)
        assert stored is not None
        state, _ = load_state(Path(stored.stored_at))
        assert state_digest(state) == stored.model_state_sha256


def test_deleting_a_folder_goes_through_a_deleting_folder_and_leaves_none(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, max_superseded=2)
    # 2 then 3 run again with a copy of the current model already aside (the current
    # folder is deleted); 4 sets 3 aside and prunes the oldest copy (1's).
    for value in (1.0, 2.0, 1.0, 2.0, 3.0, 4.0):
        store.save(artifact(5, value))

    def aside(value: float) -> str:
        return f"round-000005.superseded-{state_digest({'w': torch.full((4,), value)})[:16]}"

    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == sorted(
        ["round-000005", aside(2.0), aside(3.0)]
    )


def test_a_reopened_coordinator_store_clears_temporaries_and_resumes(tmp_path: Path) -> None:
    store = CoordinatorStore(tmp_path)
    base = {"w": torch.arange(6, dtype=torch.float32)}
    store.save_initial_base(base)
    store.check_identity({"consortium_id": "c"})
    (tmp_path / ".gitignore").write_text("*\n")  # not ours: a data dir may hold such files
    complete = tree(tmp_path)
    # A kill inside a commit: safetensors' own temporary (a random name, so the next
    # commit never overwrites it), then atomic_files' one, for the base and the journal.
    (tmp_path / "base" / ".tmpQ8x2Lm").write_bytes(b"part of a base")
    (tmp_path / "base" / ".round-000001.safetensors.tmp").write_bytes(b"part of a base")
    (tmp_path / "rounds" / ".round-000001.json.tmp").write_text("{")
    (tmp_path / ".consortium.json.tmp").write_text("{")

    resumed = CoordinatorStore(tmp_path).latest()

    assert tree(tmp_path) == complete
    assert resumed is not None and resumed[0] == 0
    assert state_digest(resumed[1]) == state_digest(base)
