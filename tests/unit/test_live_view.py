"""Following a round in the CLI: the live table's rows, and the plain lines of a pipe, which
are throttled for training steps and fit 80 columns."""

from __future__ import annotations

import io

from rich.console import Console

from tapestry.cli import report
from tapestry.cli.live import PlainProgress, RoundView
from tapestry.consortium.v1 import consortium_pb2 as pb

from .test_report import FAILED_REASON, assert_fits, rendered


def node_event(node_id: str, stage: int, detail: str = "", **progress: object) -> pb.RoundProgress:
    event = pb.RoundProgress(round_num=4, stage=stage, node_id=node_id, detail=detail)
    if progress:
        event.progress.CopyFrom(pb.CycleProgress(**progress))  # type: ignore[arg-type]
    return event


def training(node_id: str, step: int, total: int = 240, loss: float = 4.1234) -> pb.RoundProgress:
    return node_event(
        node_id,
        pb.ROUND_STAGE_NODE_PROGRESS,
        f"training step {step}/{total}, loss {loss:.4f}",
        phase=pb.CYCLE_PHASE_TRAINING,
        step=step,
        total_steps=total,
        loss=loss,
    )


def test_the_live_view_has_a_row_per_node_with_its_phase_step_and_loss() -> None:
    view = RoundView("2 of 5", nodes=["vietnam", "switzerland", "india", "late"], clock=lambda: 0.0)
    view.update(node_event("vietnam", pb.ROUND_STAGE_NODE_STARTED, "training from the base"))
    view.update(training("vietnam", 120))
    view.update(node_event("switzerland", pb.ROUND_STAGE_NODE_STARTED))
    view.update(node_event("switzerland", pb.ROUND_STAGE_NODE_PROGRESS,
                           phase=pb.CYCLE_PHASE_SENDING_DELTA))  # fmt: skip
    view.update(node_event("india", pb.ROUND_STAGE_NODE_FAILED, FAILED_REASON))

    lines = rendered(view)
    assert lines[0].rstrip() == "Round 4 (2 of 5) · 1/4 nodes done · 0 s"
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert "training" in rows["vietnam"] and "120/240" in rows["vietnam"]
    assert "4.1234" in rows["vietnam"]
    assert "sending delta" in rows["switzerland"]
    assert "failed" in rows["india"] and "NodeCall" in rows["india"]  # cut to fit
    assert "waiting" in rows["late"]
    assert_fits(lines)


def test_the_live_view_shows_the_round_wide_stage_once_reached() -> None:
    view = RoundView(clock=lambda: 0.0)
    view.update(node_event("vietnam", pb.ROUND_STAGE_NODE_CONTRIBUTED, "loss 4.0"))
    view.update(pb.RoundProgress(round_num=4, stage=pb.ROUND_STAGE_COMMITTED, detail="base ab12"))
    lines = rendered(view)
    assert lines[0].rstrip() == "Round 4 · 1/1 nodes done · 0 s"
    assert lines[-1] == "  committed: base ab12"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_a_training_line_per_node_every_few_seconds_and_the_last() -> None:
    out = Console(file=io.StringIO(), width=report.WIDTH)
    clock = Clock()
    follow = PlainProgress(out, interval_s=5.0, clock=clock)
    follow(node_event("india", pb.ROUND_STAGE_NODE_STARTED, "training from the round's base"))
    follow(node_event("india", pb.ROUND_STAGE_NODE_PROGRESS, phase=pb.CYCLE_PHASE_BASE_RECEIVED,
                      state_bytes=66560, tensor_count=3))  # fmt: skip
    for step in range(1, 241):
        clock.now = step * 0.25  # four steps a second
        follow(training("india", step))
        follow(training("vietnam", step))

    lines = out.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[:3] == [
        "  · india: started — training from the round's base",
        "  · india: base received (3 tensors, 65.0 KiB)",
        "  · india: training step 1/240, loss 4.1234",
    ]
    india = [line for line in lines if line.startswith("  · india: training step")]
    assert [line.split()[4].rstrip(",") for line in india] == [
        f"{k}/240" for k in (1, *range(21, 240, 20), 240)
    ]
    assert sum(line.startswith("  · vietnam: ") for line in lines) == len(india)
    assert_fits(lines)


def transfer(node_id: str, phase: int, done: int, total: int, resumes: int = 0) -> pb.RoundProgress:
    return node_event(
        node_id,
        pb.ROUND_STAGE_NODE_PROGRESS,
        phase=phase,
        state_bytes=done,
        total_bytes=total,
        bytes_per_s=45.2e6,
        resumes=resumes,
    )


def test_a_streaming_state_shows_its_bytes_rate_and_resumes_with_its_bar() -> None:
    view = RoundView(nodes=["vietnam", "india"], clock=lambda: 0.0)
    mib = 1 << 20
    view.update(transfer("vietnam", pb.CYCLE_PHASE_SENDING_BASE, 12 * mib, 95 * mib))
    view.update(transfer("india", pb.CYCLE_PHASE_SENDING_DELTA, 48 * mib, 95 * mib, resumes=2))
    assert (view.rows["vietnam"].moved, view.rows["vietnam"].total_bytes) == (12 * mib, 95 * mib)
    lines = rendered(view)
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert "sending base" in rows["vietnam"]
    assert "12M/95M" in rows["vietnam"] and "45 MB/s" in rows["vietnam"]
    assert "sending delta" in rows["india"]
    assert "48M/95M" in rows["india"] and "45 MB/s 2 resumed" in rows["india"]
    assert_fits(lines)


def test_plain_progress_prints_a_transfers_first_and_last_lines_and_few_between() -> None:
    out = Console(file=io.StringIO(), width=report.WIDTH)
    clock = Clock()
    follow = PlainProgress(out, interval_s=5.0, clock=clock)
    total = 100 << 20
    for tick in range(0, 101):  # a report every 0.5 s, 1 MiB each, resumed once halfway
        clock.now = tick * 0.5
        follow(transfer("india", pb.CYCLE_PHASE_SENDING_BASE, tick << 20, total, tick // 50))
    lines = out.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[0] == "  · india: sending base (0 B of 100.0 MiB, 45.2 MB/s)"
    assert lines[-1] == "  · india: sending base (100.0 MiB of 100.0 MiB, 45.2 MB/s, 2 resumed)"
    # The first, one every 5 s (10 to 90 MiB), and the last.
    assert [line.split("(")[1].split(" of")[0] for line in lines] == [
        "0 B",
        *(f"{mib}.0 MiB" for mib in range(10, 100, 10)),
        "100.0 MiB",
    ]
    assert_fits(lines)
