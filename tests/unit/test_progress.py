"""Node progress in the core: the throttle, the bounds on a report, the in-process nodes'
progress as round events, and the node service's relay from the training thread."""

from __future__ import annotations

import math
import threading

import pytest
from torch import nn

from tapestry.node.cycle_progress import reporting
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    CyclePhase,
    CycleProgress,
    ModelState,
    RoundEvent,
    RoundStage,
    SovereignCycleResult,
    SovereignTrainingNode,
)
from tapestry.training.consortium.governance.checks import progress_problem
from tapestry.training.consortium.progress import ProgressThrottle, throttled
from tapestry.training.consortium.round.relay import reports_progress

from .conftest import MakeNodes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step(k: int, total: int = 100, loss: float | None = 1.0) -> CycleProgress:
    return CycleProgress(CyclePhase.TRAINING, k, total, loss)


# --- the throttle -----------------------------------------------------------------------


def test_the_throttle_passes_one_training_step_per_interval_and_always_the_last() -> None:
    clock = Clock()
    throttle = ProgressThrottle(5.0, clock=clock)
    passed = []
    for k in range(1, 101):
        clock.now = float(k)  # a step a second
        if throttle.admit(step(k)):
            passed.append(k)
    assert passed == [1, *range(6, 100, 5), 100]


def test_the_throttle_passes_every_report_that_is_not_a_training_step() -> None:
    throttle = ProgressThrottle(60.0, clock=Clock())
    assert throttle.admit(step(1))
    for phase in (CyclePhase.BASE_RECEIVED, CyclePhase.SENDING_DELTA, CyclePhase.DELTA_RECEIVED):
        assert throttle.admit(CycleProgress(phase))
    assert not throttle.admit(step(2))


def test_a_report_budget_spreads_the_reports_over_the_steps_however_long_it_trains() -> None:
    """A day of training at 10 steps a second still sends at most max_reports + the last."""
    clock = Clock()
    throttle = ProgressThrottle(0.5, max_reports=10, clock=clock)
    total = 864_000
    passed = []
    for k in range(1, total + 1, 7):  # not every step: the test stays fast
        clock.now = k * 0.1
        if throttle.admit(step(k, total)):
            passed.append(k)
    assert throttle.admit(step(total, total))
    assert len(passed) <= 10
    assert all(b - a >= total // 10 for a, b in zip(passed, passed[1:], strict=False))


def test_throttled_calls_back_only_for_what_the_throttle_passes() -> None:
    seen: list[CycleProgress] = []
    report = throttled(seen.append, ProgressThrottle(1.0, clock=Clock()))
    for k in (1, 2, 3):
        report(step(k, 3))
    assert [p.step for p in seen] == [1, 3]


# --- what a report may say --------------------------------------------------------------


@pytest.mark.parametrize(
    ("progress", "problem"),
    [
        (step(3, 2), "progress step 3 of 2: a step must be in [0, total_steps]"),
        (step(0, 0), "progress step 0 of 0"),
        (step(1, 2, math.nan), "progress loss nan at step 1 is not a finite number"),
        (step(1, 2, math.inf), "progress loss inf at step 1 is not a finite number"),
        (step(1, 2, -0.5), "progress loss -0.5 at step 1 is not a finite number in [0, "),
        (step(1, 2, 701.0), "[0, MAX_PROGRESS_LOSS = 700] nats"),
        (step(-1, 2), "progress step must be an integer in [0, 9007199254740992]"),
        (step(1, 2**60), "progress total_steps must be an integer in [0, 9007199254740992]"),
        (CycleProgress(CyclePhase.BASE_RECEIVED, loss=1.0), "carries a step, total or loss"),
        (CycleProgress(CyclePhase.BASE_RECEIVED, state_bytes=-1), "state_bytes must be"),
        ("training", "progress must be a CycleProgress, got str"),
    ],
)
def test_a_report_out_of_range_is_refused_naming_the_bound(progress: object, problem: str) -> None:
    assert problem in (progress_problem(progress) or "")


def test_a_report_in_range_passes() -> None:
    assert progress_problem(step(2, 2, 0.0)) is None
    assert progress_problem(step(0, 2, None)) is None
    assert (
        progress_problem(CycleProgress(CyclePhase.DELTA_RECEIVED, state_bytes=9, tensor_count=3))
        is None
    )


# --- in-process rounds ------------------------------------------------------------------


def test_in_process_nodes_report_every_step_and_the_round_relays_them_throttled(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    nodes = make_nodes()
    told: list[CycleProgress] = []
    nodes[0].run_sovereign_cycle(1, ConsortiumCoordinator(base_model).shared_base_state,
                                 on_progress=told.append)  # fmt: skip
    assert [p.step for p in told] == list(range(1, told[-1].total_steps + 1))
    assert all(p.phase is CyclePhase.TRAINING and p.loss is not None for p in told)

    events: list[RoundEvent] = []
    ConsortiumCoordinator(base_model).run_round(make_nodes(), events=events.append)
    for node_id in ("vn", "ch", "in"):
        steps = [e for e in events if e.node_id == node_id and e.stage is RoundStage.NODE_PROGRESS]
        assert steps and steps[-1].progress is not None
        assert steps[-1].progress.last_step
        assert steps[-1].detail == steps[-1].progress.describe()
        assert len(steps) < len(told)  # throttled: these rounds take milliseconds


def test_the_poc_api_is_unchanged_and_a_node_without_on_progress_still_runs(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    class Plain:
        def __init__(self, inner: SovereignTrainingNode) -> None:
            self.node_id = inner.node_id
            self.inner = inner

        def run_sovereign_cycle(
            self, round_num: int, base_state: ModelState
        ) -> SovereignCycleResult:
            return self.inner.run_sovereign_cycle(round_num, base_state)

    vn, ch = make_nodes(("vn", "ch"))
    assert reports_progress(vn) and not reports_progress(Plain(ch))
    assert vn.run_sovereign_cycle(1, ConsortiumCoordinator(base_model).shared_base_state)
    events: list[RoundEvent] = []
    result = ConsortiumCoordinator(base_model).run_round([Plain(ch)], events=events.append)
    assert result.accepted_nodes == ["ch"]
    assert RoundStage.NODE_PROGRESS not in {e.stage for e in events}


def test_a_node_whose_cycle_cannot_be_inspected_fails_itself_not_the_round(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    """Whether a node takes ``on_progress`` is asked of the node itself: a cycle that raises
    when looked up (a proxy whose connection is gone) or whose signature raises is that
    node's failure, as any error in its cycle is; the others' round goes on."""

    class Unreachable:
        node_id = "gone"

        @property
        def run_sovereign_cycle(self) -> None:
            raise RuntimeError("the node's connection is gone")

    class Unsigned:
        """A cycle whose signature cannot be read: it runs, without progress."""

        def __init__(self, inner: SovereignTrainingNode) -> None:
            self.node_id = inner.node_id
            self.inner = inner

        @property
        def run_sovereign_cycle(self):  # type: ignore[no-untyped-def]
            inner = self.inner

            class Cycle:
                @property
                def __signature__(self) -> None:
                    raise RuntimeError("no signature here")

                def __call__(self, round_num: int, base: ModelState) -> SovereignCycleResult:
                    return inner.run_sovereign_cycle(round_num, base)

            return Cycle()

    vn, ch = make_nodes(("vn", "ch"))
    result = ConsortiumCoordinator(base_model).run_round([vn, Unreachable(), Unsigned(ch)])
    assert result.accepted_nodes == ["vn", "ch"]
    assert result.failed_nodes == {"gone": "RuntimeError: the node's connection is gone"}


def test_a_node_reporting_a_non_finite_loss_is_failed_with_the_reason(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    class Diverging(SovereignTrainingNode):
        def _train(self, round_num, on_progress=None):  # type: ignore[no-untyped-def]
            assert on_progress is not None
            on_progress(CycleProgress(CyclePhase.TRAINING, 1, 4, math.inf))
            return 0.0

    vn = make_nodes(("vn",))[0]
    bad = Diverging("bad", "Nowhere", base_model, [[1, 2, 3]], 0.9)
    result = ConsortiumCoordinator(base_model).run_round([vn, bad])
    assert result.accepted_nodes == ["vn"]
    assert result.failed_nodes["bad"] == (
        "InvalidProgress: progress loss inf at step 1 is not a finite number in "
        "[0, MAX_PROGRESS_LOSS = 700] nats"
    )


# --- the node service's relay -----------------------------------------------------------


def test_reporting_yields_the_reports_as_they_come_then_returns_the_result() -> None:
    def cycle(on_progress):  # type: ignore[no-untyped-def]
        for k in (1, 2, 3):
            on_progress(step(k, 3))
        return "done"

    reports = reporting(cycle, ProgressThrottle(0.0))
    seen = []
    with pytest.raises(StopIteration) as ended:
        while True:
            seen.append(next(reports).step)
    assert seen == [1, 2, 3]
    assert ended.value.value == "done"


def test_reporting_raises_what_the_cycle_raised_and_waits_for_it_when_closed() -> None:
    def failing(on_progress):  # type: ignore[no-untyped-def]
        raise ValueError("base refused")

    with pytest.raises(ValueError, match="base refused"):
        list(reporting(failing, ProgressThrottle()))

    release = threading.Event()
    finished = threading.Event()

    def slow(on_progress):  # type: ignore[no-untyped-def]
        on_progress(step(1, 2))
        release.wait(timeout=10)
        finished.set()
        return None

    reports = reporting(slow, ProgressThrottle())
    assert next(reports).step == 1
    threading.Timer(0.05, release.set).start()
    reports.close()  # the caller went away: the cycle still ends before the node is free
    assert finished.is_set()


# -- transfers: a state on its way, as the coordinator reports it --------------------------


class _Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_transfer_meter_reports_bytes_rate_and_resumes_every_interval_and_its_last() -> None:
    from tapestry.coordinator.transfer_meter import TransferMeter

    reports: list[CycleProgress] = []
    counted: list[int] = []
    clock, resumes = _Ticks(), [0]
    meter = TransferMeter(
        CyclePhase.SENDING_BASE,
        10 << 20,
        reports.append,
        lambda: resumes[0],
        counted.append,
        interval_s=0.5,
        clock=clock,
    )
    for chunk in range(10):
        clock.now += 0.2
        if chunk == 5:
            resumes[0] = 1
        meter(1 << 20)
    assert sum(counted) == 10 << 20  # the metric is told every byte
    assert [r.state_bytes >> 20 for r in reports] == [0, 3, 6, 9, 10]
    last = reports[-1]
    assert (last.total_bytes, last.resumes, last.phase) == (10 << 20, 1, CyclePhase.SENDING_BASE)
    assert last.bytes_per_s == pytest.approx((10 << 20) / 2.0)
    assert last.describe() == ("sending base: 10485760 of 10485760 bytes at 5.2 MB/s, 1 resumed")
    assert all(progress_problem(r) is None for r in reports)


@pytest.mark.parametrize(
    ("progress", "why"),
    [
        (CycleProgress(CyclePhase.TRAINING, 1, 2, resumes=1), "carries transfer numbers"),
        (CycleProgress(CyclePhase.BASE_RECEIVED, total_bytes=9), "carries transfer numbers"),
        (CycleProgress(CyclePhase.SENDING_BASE, state_bytes=10, total_bytes=9), "10 bytes of 9"),
        (CycleProgress(CyclePhase.SENDING_DELTA, bytes_per_s=math.nan), "bytes_per_s"),
        (CycleProgress(CyclePhase.SENDING_DELTA, bytes_per_s=-1.0), "bytes_per_s"),
        (CycleProgress(CyclePhase.SENDING_DELTA, resumes=-1), "resumes"),
    ],
)
def test_transfer_numbers_out_of_place_or_range_are_refused(
    progress: CycleProgress, why: str
) -> None:
    problem = progress_problem(progress)
    assert problem is not None and why in problem


def test_transfer_progress_crosses_the_wire_exactly() -> None:
    from tapestry.wire import codec

    sent = CycleProgress(
        CyclePhase.SENDING_DELTA, state_bytes=7, total_bytes=9, bytes_per_s=1.5e6, resumes=3
    )
    assert codec.cycle_progress_from_proto(codec.cycle_progress_to_proto(sent)) == sent
    with pytest.raises(ValueError, match="progress phase"):  # a node may not report it
        codec.cycle_progress_from_proto(codec.cycle_progress_to_proto(sent), codec.NODE_PHASES)


def test_a_sending_meters_last_report_waits_until_the_peer_holds_the_state() -> None:
    """What a sender has handed on may still be on its way: its last report, with the
    resumes since, comes only with finish() (the node saying it holds the base)."""
    from tapestry.coordinator.transfer_meter import TransferMeter

    reports: list[CycleProgress] = []
    clock, resumes = _Ticks(), [0]
    meter = TransferMeter(
        CyclePhase.SENDING_BASE, 4, reports.append, lambda: resumes[0], sender=True, clock=clock
    )
    meter(4)  # all handed on at once
    assert [r.state_bytes for r in reports] == [0]
    clock.now += 2.0
    resumes[0] = 1  # the session dropped and the transfer resumed
    meter.finish()
    meter.finish()  # once
    assert [(r.state_bytes, r.total_bytes, r.resumes) for r in reports] == [(0, 4, 0), (4, 4, 1)]
    assert reports[-1].bytes_per_s == pytest.approx(2.0)
