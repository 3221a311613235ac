"""`tapestry base export --round N` reads any committed round's base over GetBase, bit for
bit and with that round's digest, and records nothing (no rollback is needed to read)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from safetensors import safe_open

from tapestry.cli import main
from tapestry.demo.launcher import LocalConsortium
from tapestry.training.consortium import state_digest

from .conftest import POLICY
from .fake_nodes import FakeNode, serve


def _export(consortium: LocalConsortium, out: Path, *round_num: str):
    args = ["base", "export", "--coordinator", consortium.coordinator_address, "--out", str(out)]
    return CliRunner().invoke(main, [*args, *round_num], env=consortium.cli_env())


def _exported(path: Path) -> tuple[dict[str, str], str]:
    with safe_open(str(path), framework="pt") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        return dict(handle.metadata()), state_digest(state)


def test_the_base_of_any_committed_round_is_exported_after_later_rounds(tmp_path):
    with (
        serve([FakeNode("alpha"), FakeNode("beta")]) as members,
        LocalConsortium(
            tmp_path, [], policy=POLICY, extra_members=members, tls=False
        ) as consortium,
    ):
        with consortium.client() as client:
            rounds = [client.run_round() for _ in range(3)]
        exports = {
            n: _export(consortium, tmp_path / f"round-{n}.st", "--round", str(n)) for n in (0, 1, 3)
        }
        newest = _export(consortium, tmp_path / "newest.st")
        never = _export(consortium, tmp_path / "never.st", "--round", "9")
        with consortium.client() as client:
            listed = client.list_rounds()
        address = consortium.coordinator_address

    digests = {0: rounds[0].previous_base_sha256} | {
        r.round_num: r.shared_base_sha256 for r in rounds
    }
    assert len(set(digests.values())) == 4  # every round moved the base
    for n, ran in exports.items():
        assert ran.exit_code == 0, ran.output
        assert (
            ran.output == f"round {n} base ({digests[n][:12]}) written to {tmp_path}/round-{n}.st\n"
        )
        metadata, digest = _exported(tmp_path / f"round-{n}.st")
        assert digest == metadata["sha256"] == digests[n]
        assert metadata["round_num"] == str(n)
    assert newest.output == f"round 3 base ({digests[3][:12]}) written to {tmp_path}/newest.st\n"
    assert never.exit_code == 1
    assert never.output == (
        f"Error: the coordinator at {address} refused the call (NOT_FOUND: NotFound: round 9 "
        "not found; committed rounds: 0..3)\n"
    )
    assert not (tmp_path / "never.st").exists()
    assert [r.round_num for r in listed] == [1, 2, 3]  # reading recorded nothing
