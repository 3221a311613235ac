"""The CLI's tables fit an 80-column terminal with realistic data, and show peers' text as
plain text."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from rich.cells import cell_len

from tapestry.cli import report
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.observe.report_data import policy_line
from tapestry.wire.codec import timestamp_to_proto

BEFORE = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
AFTER = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
STARTED = datetime(2026, 11, 25, 12, 34, 56, 789000, tzinfo=UTC)
CAP_REASON = (
    "cap max_node_weight=0.5 cannot hold with 1 accepted node(s); it needs at least 2, "
    "so nothing was integrated this round"
)
FAILED_REASON = (
    "NodeCallFailed: switzerland-federal-archive.example.ch:50061: DEADLINE_EXCEEDED: "
    "Deadline Exceeded after 3600.0 s waiting for the delta stream of round 12345"
)
UNBROKEN = "invalid contribution: unexpected tensor '" + "x" * 150 + "'"


def contribution(node_id: str, quality: float, tokens: int) -> pb.SovereignContribution:
    return pb.SovereignContribution(
        node_id=node_id,
        round_num=12345,
        quality_score=quality,
        token_count=tokens,
        metrics={"loss": 5.123456789},
    )


def realistic_round() -> pb.ConsortiumRoundResult:
    result = pb.ConsortiumRoundResult(
        round_num=12345,
        previous_base_sha256=BEFORE,
        shared_base_sha256=AFTER,
        accepted_nodes=["vietnam", "switzerland-federal-archive"],
        rejected_nodes=["india"],
        contribution_weights={"vietnam": 0.5, "switzerland-federal-archive": 0.5},
        rejection_reasons={"india": CAP_REASON},
        failed_nodes={"brazil": FAILED_REASON, "[bold red]mallory[/]": UNBROKEN},
        quality_scores={"vietnam": 0.9, "switzerland-federal-archive": 0.81, "india": 0.88},
        contributions=[
            contribution("vietnam", 0.9, 123_456_789_012),
            contribution("switzerland-federal-archive", 0.86, 987_654),
            contribution("india", 0.88, 42),
        ],
        policy=pb.ContributionPolicy(
            quality_floor=0.75, max_node_weight=0.5, weighting=pb.CONTRIBUTION_WEIGHTING_QUALITY
        ),
    )
    result.started_at.CopyFrom(timestamp_to_proto(STARTED))
    result.finished_at.CopyFrom(timestamp_to_proto(STARTED + timedelta(seconds=83.25)))
    return result


def artifact(node_id: str, jurisdiction: str) -> pb.SovereignModelArtifact:
    return pb.SovereignModelArtifact(
        node_id=node_id,
        jurisdiction=jurisdiction,
        stage="continued_pretraining",
        model_state_sha256=AFTER,
        model_state_bytes=7 * 1024**3 + 123,
        metrics={"loss": 4.98765},
        round_num=12345,
    )


def rendered(renderable: object) -> list[str]:
    out = report.console(io.StringIO())  # not a terminal: 80 columns
    out.print(renderable)
    return out.file.getvalue().splitlines()  # type: ignore[attr-defined]


def assert_fits(lines: list[str]) -> None:
    wide = [line for line in lines if cell_len(line) > report.WIDTH]
    assert wide == []
    assert report.WIDTH == 80


def flat(lines: list[str]) -> str:
    """The text with the table's wrapping undone, to look for words in it."""
    return " ".join(" ".join(lines).split())


def test_a_console_off_a_terminal_is_80_columns_wide() -> None:
    assert report.console(io.StringIO()).width == 80


def test_the_round_table_fits_80_columns_with_long_reasons() -> None:
    lines = rendered(report.round_table(realistic_round()))

    assert_fits(lines)
    text = flat(lines)
    assert lines[0].startswith("Round 12345")
    assert "vietnam accepted 0.5000 0.90 123.5G 5.1235" in text
    assert "0.81 (self 0.86)" in text  # the assessed score, and the node's own report
    assert f"base {BEFORE[:12]} -> {AFTER[:12]} in 83.25 s" in text
    assert BEFORE[:13] not in text and AFTER[:13] not in text  # digests are shortened
    assert "policy: quality weighting, floor 0.75, cap 0.5, fedavg" in text
    # Every reason is there in full, wrapped (long words folded) rather than cut.
    joined = "".join("".join(lines).split())
    for reason in (CAP_REASON, FAILED_REASON, UNBROKEN):
        assert "".join(reason.split()) in joined
    assert "india rejected: cap max_node_weight=0.5" in text
    assert "brazil failed: NodeCallFailed" in text


def test_the_round_table_and_the_report_page_tell_a_policy_in_the_same_words() -> None:
    result = realistic_round()
    result.policy.strategy = pb.INTEGRATION_STRATEGY_TRIMMED_MEAN
    result.policy.trim_fraction = 0.2
    text = flat(rendered(report.round_table(result)))
    assert (
        policy_line(result.policy)
        == "quality weighting, floor 0.75, cap 0.5, trimmed_mean trim 0.2"
    )
    assert f"policy: {policy_line(result.policy)}" in text
    result.policy.strategy = 99  # from a newer coordinator
    assert "policy: quality weighting, floor 0.75, cap 0.5, ?" in flat(
        rendered(report.round_table(result))
    )


def test_text_from_peers_is_not_markup() -> None:
    text = flat(rendered(report.round_table(realistic_round())))
    assert "[bold red]mallory[/] failed: invalid contribution" in text


def test_a_round_without_times_or_policy_still_renders() -> None:
    bare = pb.ConsortiumRoundResult(round_num=1, previous_base_sha256=BEFORE)
    lines = rendered(report.round_table(bare))
    assert_fits(lines)
    assert f"base {BEFORE[:12]} -> -" in flat(lines)


def test_the_artifacts_table_fits_80_columns() -> None:
    artifacts = [
        artifact("vietnam", "Vietnam"),
        artifact("switzerland-federal-archive", "Switzerland (Confoederatio Helvetica)"),
        artifact("india", "India"),
    ]
    lines = rendered(report.artifacts_table(artifacts))

    assert_fits(lines)
    text = flat(lines)
    assert "vietnam Vietnam 12345 continued 4.9877" in text
    assert f"{AFTER[:12]} 7.0 GiB" in text
    assert AFTER[:13] not in text
    assert "stored" not in text  # node-local paths are not on the wire, nor here


def test_the_rounds_table_fits_80_columns_with_many_members() -> None:
    members = [f"member-{i:02d}" for i in range(12)]
    rounds = [
        pb.ConsortiumRoundResult(
            round_num=n,
            accepted_nodes=members[:8],
            rejected_nodes=members[8:10],
            failed_nodes={m: "UNAVAILABLE" for m in members[10:]},
            shared_base_sha256=AFTER,
        )
        for n in (1, 2)
    ]
    rounds[0].started_at.CopyFrom(timestamp_to_proto(STARTED))
    lines = rendered(report.rounds_table(rounds))

    assert_fits(lines)
    text = flat(lines)
    assert "2026-11-25 12:34:56" in text
    assert AFTER[:12] in text and AFTER[:13] not in text
    assert "member-11" in text


def test_a_rollback_round_shows_in_the_rounds_table_within_80_columns() -> None:
    members = [f"member-{i:02d}" for i in range(12)]
    rounds = [
        pb.ConsortiumRoundResult(round_num=1, accepted_nodes=members, shared_base_sha256=BEFORE),
        pb.ConsortiumRoundResult(round_num=123456, rolled_back_to=123455, shared_base_sha256=AFTER),
        pb.ConsortiumRoundResult(round_num=123457, rolled_back_to=0, shared_base_sha256=AFTER),
    ]
    rounds[1].started_at.CopyFrom(timestamp_to_proto(STARTED))
    lines = rendered(report.rounds_table(rounds))

    assert_fits(lines)
    text = flat(lines)
    assert "123456 2026-11-25 12:34:56 rollback to 123455 - -" in text
    assert "123457 - rollback to 0 - -" in text


def test_a_rollback_is_told_in_one_line_and_in_its_round_table() -> None:
    rollback = pb.ConsortiumRoundResult(
        round_num=3, rolled_back_to=1, previous_base_sha256=BEFORE, shared_base_sha256=AFTER
    )

    assert report.rollback_line(rollback) == (
        f"Round 3 rolled the base back to round 1's: base {BEFORE[:12]} -> {AFTER[:12]}"
    )
    lines = rendered(report.round_table(rollback))
    assert_fits(lines)
    assert "ROLLBACK: the base of round 1 restored" in flat(lines)


def test_progress_lines_name_the_node_or_the_round() -> None:
    node = pb.RoundProgress(
        round_num=3, stage=pb.ROUND_STAGE_NODE_FAILED, node_id="india", detail=FAILED_REASON
    )
    whole = pb.RoundProgress(round_num=3, stage=pb.ROUND_STAGE_COMMITTED, detail="base ab12")
    assert report.progress_line(node).plain == f"  · india: FAILED — {FAILED_REASON}"
    assert report.progress_line(whole).plain == "  · round 3: committed — base ab12"
    assert_fits(rendered(report.progress_line(node)))


def test_counts_and_sizes_are_abbreviated() -> None:
    assert [report.count(n) for n in (0, 999_999, 1_000_000, 2_345_678_901)] == [
        "0",
        "999999",
        "1.0M",
        "2.3G",
    ]
    assert [report.size(n) for n in (0, 1023, 1024, 1536 * 1024, 3 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 MiB",
        "3.0 TiB",
    ]


def _validated(scale: float | None, over: list[str] | None = None) -> pb.ConsortiumRoundResult:
    result = realistic_round()
    attempts = [
        pb.ValidationAttempt(
            scale=1.0, accepted=False, objections=["vietnam", "india"], reason="rose"
        ),
        pb.ValidationAttempt(scale=0.5, accepted=scale == 0.5, reason="no rise past 0.01"),
    ]
    result.validation.CopyFrom(
        pb.RoundValidation(
            rule="no_regression",
            tolerance=0.01,
            max_halvings=1,
            attempts=attempts,
            committed_over=over or [],
            reason="committed at step 0.5: no rise past 0.01",
        )
    )
    if scale is not None:
        result.validation.committed_scale = scale
    return result


def test_a_validated_round_shows_the_rule_each_step_and_the_verdict() -> None:
    lines = rendered(report.round_table(_validated(0.5)))

    assert_fits(lines)
    text = flat(lines)
    assert (
        "validation (no_regression, tolerance 0.01): committed at step 0.5: no rise past 0.01"
        in text
    )
    assert "step 1: refused, objections: vietnam, india" in text
    assert "step 0.5: accepted" in text


def test_the_rounds_listing_says_what_validation_did_to_a_round() -> None:
    accepted = "vietnam, switzerland-federal-archive"
    assert report._accepted(realistic_round()) == accepted
    assert report._accepted(_validated(0.5)) == f"{accepted} (step 0.5)"
    assert report._accepted(_validated(None)) == "- (the members refused it)"
    assert report._accepted(_validated(1.0, ["india"])) == f"{accepted} (over india)"
    assert_fits(rendered(report.rounds_table([realistic_round(), _validated(0.5)])))


def _measured_round(round_num: int) -> pb.ConsortiumRoundResult:
    """A round weighed by measured quality: the reversed member claimed 1.0 and measured 0."""
    result = realistic_round()
    result.round_num = round_num
    del result.contributions[:]
    result.contributions.extend(
        [contribution(n, 1.0 if n == "rogue" else 0.9, 42) for n in ("vietnam", "rogue")]
    )
    result.quality_scores.clear()
    result.quality_scores.update({"vietnam": 0.73, "rogue": 0.0})
    for node_id in ("vietnam", "rogue"):
        result.quality_sources[node_id] = pb.QUALITY_SOURCE_MEASURED
    return result


def test_the_round_table_says_where_every_weighed_score_came_from() -> None:
    text = flat(rendered(report.round_table(_measured_round(7))))
    assert "0.00 (self 1.00)" in text
    assert (
        "quality: measured against the reference corpus (vietnam, rogue); a member's own "
        "claim in brackets where it differs" in text
    )
    mixed = realistic_round()  # the consortium assessed one member; the others said
    mixed.quality_sources.update(
        {
            "vietnam": pb.QUALITY_SOURCE_SELF_REPORTED,
            "switzerland-federal-archive": pb.QUALITY_SOURCE_ASSESSED,
            "india": pb.QUALITY_SOURCE_SELF_REPORTED,
        }
    )
    lines = rendered(report.round_table(mixed))
    assert_fits(lines)
    assert (
        "quality: assessed by the consortium (switzerland-federal-archive); self-reported "
        "(vietnam, india)" in flat(lines)
    )
    assert "quality:" not in flat(rendered(report.round_table(realistic_round())))  # unrecorded


def test_the_quality_table_puts_each_source_beside_the_score_and_the_claim() -> None:
    lines = rendered(report.quality_table([realistic_round(), _measured_round(7)]))
    assert_fits(lines)
    text = flat(lines)
    assert "7 vietnam 0.5000 0.73 measured 0.90" in text
    assert "7 rogue - 0.00 measured 1.00" in text
    assert "12345" not in text  # a round that records no source has no rows
    assert report.quality_table([realistic_round()]) is None
