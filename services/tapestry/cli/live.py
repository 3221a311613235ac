"""Following a running round: a live table on a terminal, throttled plain lines elsewhere.

Both are fed the coordinator's ``RoundProgress`` events. On a terminal, :class:`RoundView`
keeps one row per node (waiting, receiving base, training step k/K with its loss, sending
delta, delta received, contributed, failed) under a round header, redrawn by rich's
``Live``. In a pipe or a CI log, :class:`PlainProgress` prints one line per event as
before, except training steps: one per node every :data:`PLAIN_TRAINING_INTERVAL_S`, and
the last.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tapestry.cli import report
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium.progress import ProgressThrottle
from tapestry.wire.codec import cycle_progress_from_proto

PLAIN_TRAINING_INTERVAL_S = 5.0
"""Least time between two printed training lines of one node when the output is not a
terminal: a log wants the trend, not two lines a second per node."""

_NODE_STAGES = {
    pb.ROUND_STAGE_NODE_STARTED: "receiving base",
    pb.ROUND_STAGE_NODE_CONTRIBUTED: "contributed",
    pb.ROUND_STAGE_NODE_FAILED: "failed",
}
_BAR_WIDTH = 16
_NODE_CHARS = 20  # longer node ids are cut with an ellipsis


@dataclass
class _Row:
    """What the view knows of one node."""

    phase: str = "waiting"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    note: str = ""
    moved: int = 0  # bytes of the state streaming now (sending base, sending delta)
    total_bytes: int = 0


_DELTA_PHASES = (pb.CYCLE_PHASE_SENDING_DELTA, pb.CYCLE_PHASE_DELTA_RECEIVED)
# The rows' phases while a state streams: their bar and step column show its bytes.
_TRANSFER_NAMES = tuple(report.PHASE_NAMES[phase] for phase in report.TRANSFER_PHASES)


class RoundView:
    """The live state of one round: one row per node, in the order they were first heard
    of (``nodes`` first: e.g. the previous round's, shown as waiting until they start)."""

    def __init__(
        self, label: str = "", nodes: Sequence[str] = (), clock: Callable[[], float] = time.time
    ) -> None:
        self.label = label  # e.g. "2 of 5": which of the command's rounds this is
        self.round_num = 0
        self.rows: dict[str, _Row] = {node_id: _Row() for node_id in nodes}
        self.closing = ""  # the round-wide stage reached (integrated, committed, ...)
        self._clock = clock
        self._began = clock()
        self._lock = threading.Lock()  # rich's Live redraws from a thread of its own

    def update(self, event: pb.RoundProgress) -> None:
        with self._lock:
            self._update(event)

    def _update(self, event: pb.RoundProgress) -> None:
        self.round_num = event.round_num or self.round_num
        if not event.node_id:
            self.closing = f"{report.STAGE_NAMES.get(event.stage, '?')}: {event.detail}"
            return
        row = self.rows.setdefault(event.node_id, _Row())
        if event.stage == pb.ROUND_STAGE_NODE_PROGRESS and event.HasField("progress"):
            progress = event.progress
            # A contributed node's delta is fetched after the policy has weighed every node:
            # it stays "contributed" (done) while its delta streams in.
            if not (row.phase == "contributed" and progress.phase in _DELTA_PHASES):
                row.phase = report.PHASE_NAMES.get(progress.phase, "?")
            if progress.phase == pb.CYCLE_PHASE_TRAINING:
                row.step, row.total_steps = progress.step, progress.total_steps
                row.loss = progress.loss if progress.HasField("loss") else row.loss
            elif progress.phase in report.TRANSFER_PHASES:
                row.moved, row.total_bytes = progress.state_bytes, progress.total_bytes
                resumed = f" {progress.resumes} resumed" if progress.resumes else ""
                row.note = f"{progress.bytes_per_s / 1e6:.0f} MB/s{resumed}"
            elif progress.phase == pb.CYCLE_PHASE_DELTA_RECEIVED:
                row.moved = row.total_bytes = 0
                row.note = report.size(progress.state_bytes)
        elif event.stage in _NODE_STAGES:
            row.phase = _NODE_STAGES[event.stage]
            row.note = event.detail if event.stage != pb.ROUND_STAGE_NODE_STARTED else ""

    def header(self) -> str:
        done = sum(row.phase in ("contributed", "failed") for row in self.rows.values())
        which = f"Round {self.round_num or '…'}" + (f" ({self.label})" if self.label else "")
        took = self._clock() - self._began
        return f"{which} · {done}/{len(self.rows)} nodes done · {took:.0f} s"

    def __rich_console__(
        self, console: Console, options: ConsoleOptions
    ) -> Iterator[RenderableType]:
        with self._lock:
            yield self._render(options.max_width)

    def _render(self, width: int) -> RenderableType:
        table = Table(
            title=self.header(),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            padding=(0, 1, 0, 0),
        )
        # Every column keeps its width; the detail (a failure's reason) gets what is left.
        names = max(4, min(max((len(n) for n in self.rows), default=4), _NODE_CHARS))
        # Widths count the cell padding (two columns in all, measured).
        fixed = {"node": names, "phase": 14, "progress": _BAR_WIDTH, "step": 9, "loss": 6}
        fixed = {name: chars + 2 for name, chars in fixed.items()}
        for name, chars in fixed.items():
            table.add_column(name, no_wrap=True, width=chars, overflow="ellipsis")
        left = width - sum(fixed.values())
        table.add_column("detail", no_wrap=True, overflow="ellipsis", width=max(left, 8))
        for node_id, row in self.rows.items():
            total = row.total_steps or None
            completed = row.step if row.total_steps else 0
            if row.phase in ("sending delta", "delta received", "contributed"):
                total, completed = 1, 1
            if row.phase in _TRANSFER_NAMES and row.total_bytes:
                total, completed = row.total_bytes, row.moved
            table.add_row(
                Text(node_id, overflow="ellipsis"),
                Text(row.phase, style="red" if row.phase == "failed" else ""),
                ProgressBar(total=total, completed=completed, width=_BAR_WIDTH)
                if row.phase not in ("waiting", "failed")
                else Text(""),
                Text(_count(row)),
                Text(f"{row.loss:.4f}" if row.loss is not None else "-"),
                Text(row.note),  # a peer's text: plain, never markup
            )
        if not self.closing:
            return table
        return Group(table, Text(f"  {self.closing}"))


def _count(row: _Row) -> str:
    """The step column: training steps, or a streaming state's bytes (``12M/95M``)."""
    if row.phase in _TRANSFER_NAMES and row.total_bytes:
        return f"{_short(row.moved)}/{_short(row.total_bytes)}"
    return f"{row.step}/{row.total_steps}" if row.total_steps else "-"


def _short(nbytes: int) -> str:
    """Bytes in at most four characters: 512, 64K, 95M, 1.5G."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(nbytes)


class PlainProgress:
    """Prints each event as one line (:func:`report.progress_line`), training steps
    throttled per node to one every ``interval_s`` and the last."""

    def __init__(
        self,
        out: Console,
        interval_s: float = PLAIN_TRAINING_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._interval_s = interval_s
        self._clock = clock
        self._throttles: dict[str, ProgressThrottle] = {}
        self._transfers: dict[str, float] = {}  # when each node's last transfer line printed

    def _transfer_held(self, event: pb.RoundProgress) -> bool:
        """Whether a transfer's report is held back: its first and last are printed, the
        others at most one a node every ``interval_s``."""
        progress = event.progress
        if event.stage != pb.ROUND_STAGE_NODE_PROGRESS or progress.phase not in (
            report.TRANSFER_PHASES
        ):
            return False
        now = self._clock()
        first = progress.state_bytes == 0
        last = bool(progress.total_bytes) and progress.state_bytes >= progress.total_bytes
        printed = self._transfers.get(event.node_id)
        if not (first or last) and printed is not None and now - printed < self._interval_s:
            return True
        self._transfers[event.node_id] = now
        return False

    def __call__(self, event: pb.RoundProgress) -> None:
        if self._transfer_held(event):
            return
        if event.stage == pb.ROUND_STAGE_NODE_PROGRESS and event.HasField("progress"):
            throttle = self._throttles.setdefault(
                event.node_id, ProgressThrottle(self._interval_s, clock=self._clock)
            )
            try:
                progress = cycle_progress_from_proto(event.progress)
            except ValueError:  # the coordinator checked it; print it as it came
                progress = None
            if progress is not None and not throttle.admit(progress):
                return
        self._out.print(report.progress_line(event))
