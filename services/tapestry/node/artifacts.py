"""The node's artifact store: every sovereign model it trains, kept on its own disk.

Layout under ``<data-dir>/artifacts/``::

    round-000003/model.safetensors   the full trained state (safetensors)
    round-000003/manifest.json       node, jurisdiction, stage, round, metrics, sha256, bytes;
                                     and the cycle's held-out evaluation once it is recorded

The manifest is written last, so a round directory without one is an interrupted write.
A store opened on the directory (a node starting, after a crash say) first clears what
interrupted writes left: temporary files, such round directories, and folders that were
being deleted (renamed to ``.deleting-<name>`` first, so a half-deleted folder is never
taken for an artifact).

When a round runs again after it completed (the coordinator rolled it back, say), the
earlier artifact is kept, renamed to ``round-NNNNNN.superseded-<sha256 prefix>/`` (with
``superseded.json``, the order it was set aside in): a stored sovereign model is never
overwritten. At most ``max_superseded`` such copies are kept: past it the oldest set aside
are deleted, so replaying a round cannot fill the disk. A round's current artifact is never
among them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from tapestry.atomic_files import read_json, remove_temporaries, write_json
from tapestry.state_files import save_state
from tapestry.training.consortium.messages import HeldOutEvaluation, SovereignModelArtifact
from tapestry.training.consortium.tensors import state_digest

SUPERSEDED = ".superseded-"
SET_ASIDE = "superseded.json"  # in a superseded copy: {"sequence": n}, 1 for the first
DELETING = ".deleting-"  # a folder renamed to this prefix is on its way out


class ArtifactStore:
    def __init__(self, data_dir: Path, *, max_superseded: int = 3) -> None:
        self.root = data_dir / "artifacts"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_superseded = max_superseded
        self._clear_interrupted()

    def _clear_interrupted(self) -> None:
        """Remove what a write cut short left behind (see the module docstring)."""
        remove_temporaries(self.root)
        for path in self.root.iterdir():
            current = path.name.startswith("round-") and SUPERSEDED not in path.name
            if path.name.startswith(DELETING) or (
                current and path.is_dir() and not (path / "manifest.json").exists()
            ):
                shutil.rmtree(path)
                continue
            if path.is_dir():
                remove_temporaries(path)
            if current and (path / SET_ASIDE).exists():
                (path / SET_ASIDE).unlink()  # killed before the rename that sets it aside

    def _delete(self, directory: Path) -> None:
        """Rename first, then delete: a crash midway leaves a ``.deleting-`` folder, never
        a round folder with its manifest and part of its model."""
        doomed = self.root / f"{DELETING}{directory.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        directory.rename(doomed)
        shutil.rmtree(doomed)

    def _dir(self, round_num: int) -> Path:
        return self.root / f"round-{round_num:06d}"

    def save(self, artifact: SovereignModelArtifact) -> SovereignModelArtifact:
        """Persist the full artifact; returns its metadata with ``stored_at`` set."""
        directory = self._dir(artifact.round_num)
        self._keep_earlier(directory)
        model_path = directory / "model.safetensors"
        digest = artifact.model_state_sha256 or state_digest(artifact.model_state)
        save_state(
            model_path,
            artifact.model_state,
            {"node_id": artifact.node_id, "round_num": str(artifact.round_num), "sha256": digest},
        )
        stored = dataclasses.replace(artifact, model_state_sha256=digest, stored_at=str(model_path))
        write_json(directory / "manifest.json", manifest_of(stored))
        self._prune_superseded()
        return stored

    def record_evaluation(self, round_num: int, evaluation: HeldOutEvaluation | None) -> None:
        """Add the cycle's held-out evaluation (numbers only) to round ``round_num``'s
        manifest, rewritten atomically, so a restarted node still knows its latest held-out
        losses; nothing to do when the node held nothing out."""
        if evaluation is None:
            return
        path = self._dir(round_num) / "manifest.json"
        manifest = read_json(path)
        manifest["evaluation"] = dataclasses.asdict(evaluation)
        write_json(path, manifest)

    def newest_manifest(self) -> dict[str, Any] | None:
        """The manifest of the newest round's artifact, as stored; ``None`` when there is
        none (or it cannot be read)."""
        rounds = self.rounds()
        return self._manifest(rounds[-1]) if rounds else None

    def _manifest(self, round_num: int) -> dict[str, Any] | None:
        try:
            manifest = read_json(self._dir(round_num) / "manifest.json")
        except (OSError, json.JSONDecodeError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def _keep_earlier(self, directory: Path) -> None:
        try:
            earlier = read_json(directory / "manifest.json")
        except (OSError, json.JSONDecodeError):
            return  # nothing complete there: an interrupted write may be replaced
        aside = directory.with_name(
            f"{directory.name}{SUPERSEDED}{earlier['model_state_sha256'][:16]}"
        )
        if aside.exists():  # the very same model was kept aside before
            self._delete(directory)
            return
        # The order copies were set aside in, for pruning: file times are too coarse to
        # tell two quick re-runs apart.
        sequence = 1 + max((_sequence(p) for p in self.superseded()), default=0)
        write_json(directory / SET_ASIDE, {"sequence": sequence})
        directory.rename(aside)

    def superseded(self) -> list[Path]:
        """The copies kept aside, oldest first (in the order they were set aside)."""
        found = (p for p in self.root.glob(f"round-*{SUPERSEDED}*") if p.is_dir())
        return sorted(found, key=lambda p: (_sequence(p), p.name))

    def _prune_superseded(self) -> None:
        kept = self.superseded()
        for path in kept[: max(0, len(kept) - self.max_superseded)]:
            self._delete(path)

    def rounds(self) -> list[int]:
        found = []
        for manifest in self.root.glob("round-*/manifest.json"):
            try:
                found.append(int(manifest.parent.name.removeprefix("round-")))
            except ValueError:
                continue
        return sorted(found)

    def get(self, round_num: int = 0) -> SovereignModelArtifact | None:
        """Metadata of one round's artifact (0 = latest); ``None`` when there is none."""
        rounds = self.rounds()
        if not rounds:
            return None
        wanted = rounds[-1] if round_num == 0 else round_num
        manifest = self._manifest(wanted) if wanted in rounds else None
        if manifest is None:
            return None
        return SovereignModelArtifact(
            node_id=manifest["node_id"],
            jurisdiction=manifest["jurisdiction"],
            stage=manifest["stage"],
            model_state={},
            metrics=manifest["metrics"],
            round_num=manifest["round_num"],
            model_state_sha256=manifest["model_state_sha256"],
            model_state_bytes=manifest["model_state_bytes"],
            stored_at=manifest["stored_at"],
        )


def _sequence(aside: Path) -> int:
    try:
        return int(read_json(aside / SET_ASIDE)["sequence"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0  # set aside before sequences were recorded: oldest


def manifest_of(artifact: SovereignModelArtifact) -> dict[str, object]:
    return {
        "node_id": artifact.node_id,
        "jurisdiction": artifact.jurisdiction,
        "stage": artifact.stage,
        "round_num": artifact.round_num,
        "metrics": dict(artifact.metrics),
        "model_state_sha256": artifact.model_state_sha256,
        "model_state_bytes": artifact.model_state_bytes,
        "stored_at": artifact.stored_at,
        "format": "safetensors",
    }
