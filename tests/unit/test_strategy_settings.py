"""Choosing a strategy: the consortium file (validated at load), the policy on the wire and in
the journal (round trip), and the round table's policy line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tapestry.cli import report
from tapestry.config import ConfigError, ConsortiumConfig, load_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium import ContributionPolicy
from tapestry.training.consortium.strategies.settings import (
    IntegrationStrategy,
    OuterOptimizer,
    StrategyName,
)
from tapestry.wire.codec import (
    message_from_json,
    message_to_json,
    policy_from_proto,
    policy_to_proto,
)

from .test_config_and_corpus import CONSORTIUM

POLICY_END = "max_node_weight = 0.5\n"  # the last line of that file's [policy]


def load(tmp_path: Path, policy: str) -> ConsortiumConfig:
    """The consortium file of the config tests with ``policy`` added to its [policy]."""
    path = tmp_path / "c.toml"
    path.write_text(CONSORTIUM.replace(POLICY_END, f"{POLICY_END}{policy}\n"), "utf-8")
    return load_config(path, ConsortiumConfig)


def test_without_a_strategy_the_policy_is_fedavg(tmp_path: Path) -> None:
    assert load(tmp_path, "").policy.policy().strategy == IntegrationStrategy()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ('strategy = "median"', IntegrationStrategy(StrategyName.MEDIAN)),
        (
            'strategy = "trimmed_mean"\ntrim_fraction = 0.25\nclip_delta_norm = 3.5',
            IntegrationStrategy(StrategyName.TRIMMED_MEAN, 0.25, 3.5),
        ),
        ('strategy = "trimmed_mean"', IntegrationStrategy(StrategyName.TRIMMED_MEAN, 0.2)),
        (
            'strategy = "diloco"',
            IntegrationStrategy(StrategyName.DILOCO, outer=OuterOptimizer(0.7, 0.9, True)),
        ),
        (
            'strategy = "diloco"\n[policy.diloco]\nouter_lr = 1.0\nmomentum = 0.5\nnesterov = false',
            IntegrationStrategy(StrategyName.DILOCO, outer=OuterOptimizer(1.0, 0.5, False)),
        ),
        ("clip_delta_norm = 2", IntegrationStrategy(clip_delta_norm=2.0)),
    ],
)
def test_the_file_chooses_the_strategy(
    tmp_path: Path, policy: str, expected: IntegrationStrategy
) -> None:
    assert load(tmp_path, policy).policy.policy().strategy == expected


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ('strategy = "krum"', "policy.strategy: Input should be 'fedavg', 'diloco', 'median'"),
        (
            'strategy = "median"\ntrim_fraction = 0.1',
            "policy: trim_fraction applies to strategy 'trimmed_mean' only, not 'median': remove it",
        ),
        (
            "[policy.diloco]\nouter_lr = 0.5",
            "policy: the outer optimizer's settings apply to strategy 'diloco' only, not 'fedavg'",
        ),
        (
            'strategy = "trimmed_mean"\ntrim_fraction = 0.5',
            r"policy.trim_fraction: trim_fraction must be in \[0, 0.5\)",
        ),
        (
            "clip_delta_norm = 0",
            "policy.clip_delta_norm: clip_delta_norm must be None or a finite number > 0",
        ),
        (
            'strategy = "diloco"\n[policy.diloco]\nmomentum = 1.0',
            r"policy.diloco.momentum: outer momentum must be in \[0, 1\)",
        ),
        (
            'strategy = "diloco"\n[policy.diloco]\nouter_lr = 0',
            r"policy.diloco.outer_lr: outer lr must be in \(0, 10.0\]",
        ),
        (
            'strategy = "diloco"\n[policy.diloco]\nlr = 0.5',
            "policy.diloco.lr: Extra inputs are not permitted",
        ),
    ],
)
def test_settings_that_do_not_fit_are_refused_at_load(
    tmp_path: Path, policy: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load(tmp_path, policy)


@pytest.mark.parametrize(
    "strategy",
    [
        IntegrationStrategy(),
        IntegrationStrategy(StrategyName.MEDIAN, clip_delta_norm=1.5),
        IntegrationStrategy(StrategyName.TRIMMED_MEAN, 0.1),
        IntegrationStrategy(StrategyName.DILOCO, outer=OuterOptimizer(0.3, 0.0, False)),
        IntegrationStrategy(StrategyName.DILOCO, clip_delta_norm=9.0),
    ],
    ids=lambda s: s.describe(),
)
def test_the_strategy_round_trips_through_the_wire_and_the_journal_text(
    strategy: IntegrationStrategy,
) -> None:
    policy = ContributionPolicy(0.75, 0.5, "equal", max_quality=1.0, strategy=strategy)

    msg = policy_to_proto(policy)
    back = policy_from_proto(message_from_json(message_to_json(msg), pb.ContributionPolicy))

    assert back.strategy == strategy
    assert repr(back) == repr(policy)


def test_a_policy_recorded_before_strategies_reads_as_fedavg() -> None:
    old = pb.ContributionPolicy(
        quality_floor=0.5, max_node_weight=1.0, weighting=pb.CONTRIBUTION_WEIGHTING_QUALITY
    )
    assert old.strategy == pb.INTEGRATION_STRATEGY_UNSPECIFIED
    assert policy_from_proto(old).strategy == IntegrationStrategy()


def test_a_recorded_strategy_that_does_not_hold_is_refused() -> None:
    bad = policy_to_proto(ContributionPolicy(strategy="median"))
    bad.trim_fraction = 0.3
    with pytest.raises(ValueError, match="trim_fraction applies to strategy 'trimmed_mean' only"):
        policy_from_proto(bad)
    bad = policy_to_proto(ContributionPolicy())
    bad.strategy = 99  # type: ignore[assignment]
    with pytest.raises(ValueError, match="strategy must be one of INTEGRATION_STRATEGY_FEDAVG"):
        policy_from_proto(bad)


@pytest.mark.parametrize(
    ("strategy", "line"),
    [
        (IntegrationStrategy(), "policy: equal weighting, floor 0.75, cap 0.5, fedavg"),
        (
            IntegrationStrategy(StrategyName.DILOCO, clip_delta_norm=10.0),
            "policy: equal weighting, floor 0.75, cap 0.5, diloco lr 0.7 μ 0.9 nesterov, clip 10",
        ),
        (
            IntegrationStrategy(StrategyName.TRIMMED_MEAN),
            "policy: equal weighting, floor 0.75, cap 0.5, trimmed_mean trim 0.2",
        ),
    ],
)
def test_the_round_table_names_the_strategy_in_80_columns(
    strategy: IntegrationStrategy, line: str
) -> None:
    policy = ContributionPolicy(0.75, 0.5, "equal", strategy=strategy)
    result = pb.ConsortiumRoundResult(round_num=1, policy=policy_to_proto(policy))
    out = report.console(io.StringIO())

    out.print(report.round_table(result))

    lines = out.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert all(len(text) <= report.WIDTH for text in lines)
    assert line in " ".join(" ".join(lines).split())


def test_the_documented_example_loads_as_written(tmp_path: Path) -> None:
    page = Path(__file__).resolve().parents[2] / "docs" / "concepts" / "strategies.md"
    example = page.read_text(encoding="utf-8").split("```toml\n", 1)[1].split("```", 1)[0]
    members = CONSORTIUM[CONSORTIUM.index("[[nodes]]") :]
    path = tmp_path / "c.toml"
    path.write_text(f'consortium_id = "c"\n{example}{members}', encoding="utf-8")

    strategy = load_config(path, ConsortiumConfig).policy.policy().strategy

    assert strategy == IntegrationStrategy(
        StrategyName.DILOCO, clip_delta_norm=5.0, outer=OuterOptimizer(0.7, 0.9, True)
    )
