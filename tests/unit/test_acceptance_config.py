"""``[policy.acceptance]``'s fallback and evaluated quality as a consortium file sets them:
read into the core's acceptance policy, and refused where they cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry.config import ConfigError, ConsortiumConfig, load_config
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy

from .test_reference_corpus_config import MEMBERS

FOUR = MEMBERS + "".join(
    f'[[nodes]]\nnode_id = "{n}"\njurisdiction = "{n.title()}"\n' for n in ("kenya", "peru")
)


def _load(folder: Path, policy: str, members: str = FOUR) -> ConsortiumConfig:
    path = folder / "consortium.toml"
    path.write_text(f'consortium_id = "c"\nseed = 3\n{policy}\n{members}', "utf-8")
    return load_config(path, ConsortiumConfig)


def test_both_are_off_by_default_and_read_into_the_core_s_policy(tmp_path: Path) -> None:
    assert _load(tmp_path, "").policy.acceptance.policy() == AcceptancePolicy()
    on = _load(
        tmp_path,
        "[policy.acceptance]\ndrop_one = true\nmeasure_quality = true\nharm_scale = 0.2\n",
    )
    assert on.policy.acceptance.policy() == AcceptancePolicy(
        drop_one=True, measure=True, harm_scale=0.2
    )


def test_evaluated_quality_needs_four_members(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, "[policy.acceptance]\nmeasure_quality = true\n", MEMBERS)
    assert "measure_quality needs at least 4 members, the consortium has 2" in str(refused.value)


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        (
            '[policy.acceptance]\nrule = "off"\ndrop_one = true\n',
            'drop_one and measure_quality work through the members\' evaluations, which rule = "off"',
        ),
        (
            '[policy.acceptance]\nrule = "off"\nmeasure_quality = true\n',
            'rule = "off" turns off',
        ),
        (
            '[policy]\nreference_corpus = "public.txt"\n[policy.acceptance]\nmeasure_quality = true\n',
            "policy.reference_corpus and policy.acceptance.measure_quality each replace",
        ),
    ],
    ids=["drop-one-without-validation", "measure-without-validation", "two-measures"],
)
def test_a_setting_that_cannot_work_is_refused_naming_it(tmp_path: Path, policy, fragment) -> None:
    (tmp_path / "public.txt").write_text("some public text\n", "utf-8")
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, policy)
    assert fragment in str(refused.value)
