"""`tapestry report` on a recorded journal: rounds built by hand (committed, rejected,
failed, aborted, a rollback), rendered to a PNG and a self-contained HTML page headed by the
consortium, its model and policy, whose tables hold the journal's numbers; the figure's
panels inspected as matplotlib artists."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tapestry.cli import main as cli
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.observe import report_data as report_data_module
from tapestry.observe.heldout import HeldOutLosses
from tapestry.observe.report_data import model_line, policy_line, report_data, served_model
from tapestry.observe.report_figure import BASE_LABEL, OWN_LABEL, build_figure, verdict
from tapestry.observe.report_page import write_report
from tapestry.wire.codec import message_to_json, timestamp_to_proto

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JURISDICTIONS = {"vietnam": "Vietnam", "switzerland": "Switzerland", "india": "India"}
STARTED = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
# (node, round) -> held-out losses: of the base the node received, of its new model.
EVALUATIONS = {
    ("vietnam", 1): HeldOutLosses(5.5, 4.25),
    ("switzerland", 1): HeldOutLosses(5.4, 4.5),
    ("india", 1): HeldOutLosses(5.6, 4.75),
    ("vietnam", 2): HeldOutLosses(4.8, 3.9),
    ("switzerland", 2): HeldOutLosses(4.7, 4.0),
    ("india", 2): HeldOutLosses(4.9, 4.1),
    ("vietnam", 3): HeldOutLosses(4.2, 3.5),
    ("vietnam", 5): HeldOutLosses(4.3, 3.4),
    ("switzerland", 5): HeldOutLosses(4.1, 3.6),
    ("india", 5): HeldOutLosses(4.4, 3.7),
}
HOSTILE = "<script>alert(1)</script>"
POLICY = pb.ContributionPolicy(
    quality_floor=0.75, max_node_weight=0.5, weighting=pb.CONTRIBUTION_WEIGHTING_QUALITY
)
GPT = {
    "architecture": "gpt", "vocab_size": 256, "hidden_size": 64, "n_layers": 2, "n_heads": 2,
    "context_length": 128, "tie_embeddings": True,
}  # fmt: skip
IDENTITY = {"consortium_id": "tapestry-demo", "seed": 7, "model": GPT}  # consortium.json
GPT_LINE = "gpt: vocab 256, hidden 64, 2 layers, 2 heads, context 128, tied embeddings"
POLICY_LINE = "quality weighting, floor 0.75, cap 0.5, fedavg"


def _digest(n: int) -> str:
    return f"{n:x}" * 64


def _contribution(node: str, round_num: int, *, evaluated: bool) -> pb.SovereignContribution:
    c = pb.SovereignContribution(
        node_id=node, round_num=round_num, quality_score=0.9, token_count=100,
        metrics={"loss": 6.0 - round_num / 10},
    )  # fmt: skip
    losses = EVALUATIONS.get((node, round_num))
    if evaluated and losses is not None and "evaluation" in c.DESCRIPTOR.fields_by_name:
        c.evaluation.base_loss = losses.base  # type: ignore[attr-defined]
        c.evaluation.sovereign_loss = losses.sovereign  # type: ignore[attr-defined]
    return c


def _round(
    round_num: int,
    accepted: dict[str, float],
    *,
    rejected: dict[str, str] | None = None,
    failed: dict[str, str] | None = None,
    answered: tuple[str, ...] = (),
    aborted: str = "",
    evaluated: bool = True,
) -> pb.ConsortiumRoundResult:
    rejected = rejected or {}
    contributors = [*accepted, *rejected, *answered]
    result = pb.ConsortiumRoundResult(
        round_num=round_num,
        previous_base_sha256=_digest(round_num - 1),
        shared_base_sha256=_digest(round_num if accepted else round_num - 1),
        accepted_nodes=list(accepted),
        rejected_nodes=list(rejected),
        contribution_weights=accepted,
        rejection_reasons=rejected,
        failed_nodes=failed or {},
        contributions=[_contribution(n, round_num, evaluated=evaluated) for n in contributors],
        artifacts=[
            pb.SovereignModelArtifact(node_id=n, jurisdiction=JURISDICTIONS[n], round_num=round_num)
            for n in contributors
        ],
        aborted_reason=aborted,
        policy=POLICY,
    )
    result.started_at.CopyFrom(timestamp_to_proto(STARTED + timedelta(minutes=round_num)))
    result.finished_at.CopyFrom(
        timestamp_to_proto(STARTED + timedelta(minutes=round_num, seconds=12.5))
    )
    return result


def recorded_journal(evaluated: bool = True) -> list[pb.ConsortiumRoundResult]:
    rollback = pb.ConsortiumRoundResult(
        round_num=4, previous_base_sha256=_digest(2), shared_base_sha256=_digest(1),
        rolled_back_to=1, policy=POLICY,
    )  # fmt: skip
    return [
        _round(1, {"vietnam": 0.35, "switzerland": 0.3, "india": 0.35}, evaluated=evaluated),
        _round(
            2,
            {"vietnam": 0.5, "switzerland": 0.5},
            rejected={"india": "quality 0.70 is below the floor 0.75"},
            failed={"brazil": f"NodeCallFailed: UNAVAILABLE {HOSTILE}"},
            evaluated=evaluated,
        ),  # fmt: skip
        _round(
            3,
            {},
            answered=("vietnam",),
            failed={"switzerland": "DEADLINE_EXCEEDED", "india": "DEADLINE_EXCEEDED"},
            aborted="quorum not met: 1 of 2 nodes contributed",
            evaluated=evaluated,
        ),  # fmt: skip
        rollback,
        _round(5, {"vietnam": 0.4, "switzerland": 0.3, "india": 0.3}, evaluated=evaluated),
    ]


@pytest.fixture
def evaluations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the wire carries held-out evaluation, the report reads it through
    ``heldout_losses``: feed it the recorded numbers by (node, round)."""
    if "evaluation" in pb.SovereignContribution.DESCRIPTOR.fields_by_name:
        return
    monkeypatch.setattr(
        report_data_module,
        "heldout_losses",
        lambda c: EVALUATIONS.get((c.node_id, c.round_num)),
    )


class _Tables(HTMLParser):
    """Every <table id=...> as rows of cell texts; every src/href and tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.links: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self._table = ""
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        for name in ("src", "href", "srcset", "action", "data"):
            if name in values:
                self.links.append((tag, name, values[name] or ""))
        if tag == "table":
            self._table = values.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr":
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(html: str) -> _Tables:
    parser = _Tables()
    parser.feed(html)
    return parser


def test_the_report_on_a_recorded_journal_writes_a_png_and_a_self_contained_page(
    tmp_path: Path, evaluations: None
) -> None:
    png_path, html_path = write_report(recorded_journal(), tmp_path / "out", IDENTITY)

    assert png_path == tmp_path / "out" / "report.png"
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)
    html = html_path.read_text(encoding="utf-8")
    page = _parse(html)
    # Self-contained: the one resource is the PNG itself, inline; nothing to fetch.
    assert page.links == [("img", "src", page.links[0][2])]
    assert page.links[0][2].startswith("data:image/png;base64,")
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert "url(" not in html and "://" not in html
    # A peer's text is shown, never interpreted.
    assert HOSTILE not in html
    # The page says what the rounds were of.
    assert "<h1>Tapestry consortium tapestry-demo: rounds 1–5</h1>" in html
    assert (
        '<dl id="about"><dt>consortium</dt><dd>tapestry-demo</dd>'
        f"<dt>model</dt><dd>{GPT_LINE}</dd>"
        f"<dt>policy</dt><dd>{POLICY_LINE}</dd></dl>"
    ) in html

    assert page.tables["rounds"] == [
        ["round", "outcome", "accepted", "rejected", "failed", "seconds", "base after"],
        ["1", "committed", "3", "0", "0", "12.50", 12 * "1"],
        ["2", "committed", "2", "1", "1", "12.50", 12 * "2"],
        ["3", "aborted", "0", "0", "2", "12.50", 12 * "2"],
        ["4", "rollback to 1", "0", "0", "0", "", 12 * "1"],
        ["5", "committed", "3", "0", "0", "12.50", 12 * "5"],
    ]
    # The base a node received in round r is the base after round r - 1.
    assert page.tables["base-loss"] == [
        ["base after round", "Vietnam", "Switzerland", "India"],
        ["0", "5.5000", "5.4000", "5.6000"],
        ["1", "4.8000", "4.7000", "4.9000"],
        ["2", "4.2000", "", ""],
        ["4", "4.3000", "4.1000", "4.4000"],
    ]
    assert page.tables["sovereign-loss"] == [
        ["round", "Vietnam", "Switzerland", "India"],
        ["1", "4.2500", "4.5000", "4.7500"],
        ["2", "3.9000", "4.0000", "4.1000"],
        ["3", "3.5000", "", ""],
        ["5", "3.4000", "3.6000", "3.7000"],
    ]
    assert page.tables["weights"] == [
        ["round", "Vietnam", "Switzerland", "India"],
        ["1", "0.3500", "0.3000", "0.3500"],
        ["2", "0.5000", "0.5000", ""],
        ["5", "0.4000", "0.3000", "0.3000"],
    ]
    assert page.tables["reasons"] == [
        ["round", "node", "outcome", "reason"],
        ["2", "India", "rejected", "quality 0.70 is below the floor 0.75"],
        ["2", "brazil", "failed", f"NodeCallFailed: UNAVAILABLE {HOSTILE}"],
        ["3", "India", "failed", "DEADLINE_EXCEEDED"],
        ["3", "Switzerland", "failed", "DEADLINE_EXCEEDED"],
    ]
    assert page.tables["train-loss"][1] == ["1", "5.9000", "5.9000", "5.9000"]


def _figure(rounds: list[pb.ConsortiumRoundResult], identity: dict | None = IDENTITY) -> Figure:
    figure = build_figure(report_data(rounds, identity))
    assert isinstance(figure.canvas, FigureCanvasAgg)
    figure.canvas.draw()  # lays the figure out, as saving it does
    return figure


def _titled(figure: Figure, first_line: str) -> Axes:
    (found,) = [a for a in figure.axes if a.get_title().split("\n")[0] == first_line]
    return found


def test_the_figure_is_headed_by_the_consortium_its_model_and_policy(evaluations: None) -> None:
    figure = _figure(recorded_journal())
    assert figure.get_suptitle() == (
        f"Tapestry consortium tapestry-demo: rounds 1–5\nmodel {GPT_LINE}\npolicy: {POLICY_LINE}"
    )


def test_one_axis_per_jurisdiction_holds_its_base_and_its_own_model(evaluations: None) -> None:
    figure = _figure(recorded_journal())
    lossy = [a for a in figure.axes if a.get_lines()]
    assert [a.get_title().split("\n")[0] for a in lossy] == ["Vietnam", "Switzerland", "India"]
    vietnam = _titled(figure, "Vietnam")
    lines = {line.get_label(): line for line in vietnam.get_lines()}
    assert sorted(lines) == sorted([BASE_LABEL, OWN_LABEL])
    # Both keyed by round r: the base committed by round r, the model trained in round r.
    assert list(lines[BASE_LABEL].get_xdata()) == [0, 1, 2, 4]
    assert list(lines[BASE_LABEL].get_ydata()) == [5.5, 4.8, 4.2, 4.3]
    assert list(lines[OWN_LABEL].get_xdata()) == [1, 2, 3, 5]
    assert list(lines[OWN_LABEL].get_ydata()) == [4.25, 3.9, 3.5, 3.4]
    assert vietnam.get_title() == "Vietnam\nround 2: base 4.200 vs own 3.900, own better"
    # The panels share their rounds.
    assert all(a.get_shared_x_axes().joined(vietnam, a) for a in lossy)


def test_legends_stay_clear_of_the_bars_and_lines(evaluations: None) -> None:
    figure = _figure(recorded_journal())
    whole = figure.bbox
    for title in (
        "Weight of each node in the shared base, per round",
        "Nodes accepted, rejected and failed, per round",
    ):
        axes = _titled(figure, title)
        legend = axes.get_legend()
        assert legend is not None
        box = legend.get_window_extent()
        assert not box.overlaps(axes.get_window_extent()), title
        assert all(whole.contains(x, y) for x, y in box.corners())  # and inside the picture
    (shared,) = [legend for sub in figure.subfigs for legend in sub.legends]
    box = shared.get_window_extent()
    assert [t.get_text() for t in shared.get_texts()] == [BASE_LABEL, f"{OWN_LABEL} (its colour)"]
    assert not any(box.overlaps(a.get_window_extent()) for a in figure.axes)


def test_the_verdict_is_judged_on_the_numbers_shown() -> None:
    assert verdict({1: 4.0}, {1: 4.5}) == "round 1: base 4.000 vs own 4.500, base better"
    assert verdict({1: 4.0, 2: 3.9}, {1: 4.5, 2: 3.8}) == (
        "round 2: base 3.900 vs own 3.800, own better"
    )
    assert verdict({2: 3.9000001}, {2: 3.9}) == "round 2: base 3.900 vs own 3.900, a tie"
    assert verdict({0: 5.0}, {1: 4.0}) == (
        "no round with both yet (a base is measured in the next round)"
    )


def test_models_and_policies_are_told_in_a_few_words() -> None:
    assert model_line(GPT) == GPT_LINE
    assert model_line({"architecture": "tiny-causal", "vocab_size": 256, "hidden_size": 32}) == (
        "tiny-causal: vocab 256, hidden 32"
    )
    hf = {"architecture": "hf-causal-lm", "vocab_size": 320, "hf_config": {"model_type": "llama"}}
    assert model_line(hf) == "hf-causal-lm: llama, vocab 320"
    served = pb.ModelSpec(architecture="tiny-causal", vocab_size=256, hidden_size=32, n_layers=2)
    assert model_line(served_model(served)) == "tiny-causal: vocab 256, hidden 32"
    diloco = pb.ContributionPolicy(
        quality_floor=0.5, max_node_weight=1, weighting=pb.CONTRIBUTION_WEIGHTING_EQUAL,
        strategy=pb.INTEGRATION_STRATEGY_DILOCO,
        outer=pb.OuterOptimizer(lr=0.7, momentum=0.9, nesterov=True),
    )  # fmt: skip
    assert policy_line(diloco) == "equal weighting, floor 0.5, cap 1, diloco lr 0.7 μ 0.9 nesterov"


def test_a_change_of_policy_is_told_with_its_rounds(tmp_path: Path) -> None:
    journal = recorded_journal(evaluated=False)
    journal[-1].policy.max_node_weight = 0.4
    _, html_path = write_report(journal, tmp_path)
    html = html_path.read_text(encoding="utf-8")
    assert (
        f"<dt>policy</dt><dd>rounds 1–4: {POLICY_LINE}</dd>"
        "<dd>rounds 5: quality weighting, floor 0.75, cap 0.4, fedavg</dd></dl>"
    ) in html
    # Without an identity the page says the consortium and model are not named.
    assert "<h1>Tapestry consortium: rounds 1–5</h1>" in html
    assert "<dt>consortium</dt><dd>not named" in html
    assert "<dt>model</dt><dd>not recorded</dd>" in html


def test_without_held_out_evaluation_the_report_says_so(tmp_path: Path) -> None:
    _, html_path = write_report(recorded_journal(evaluated=False), tmp_path)
    page = _parse(html := html_path.read_text(encoding="utf-8"))
    assert html.count("no held-out evaluation recorded") == 2
    assert "base-loss" not in page.tables and "sovereign-loss" not in page.tables
    assert page.tables["weights"][1] == ["1", "0.3500", "0.3000", "0.3500"]
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def test_an_empty_journal_still_gives_both_files(tmp_path: Path) -> None:
    png_path, html_path = write_report([], tmp_path)
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)
    assert "no rounds recorded" in html_path.read_text(encoding="utf-8")


def test_several_nodes_of_one_jurisdiction_are_told_apart() -> None:
    result = _round(1, {"vietnam": 0.5, "india": 0.5}, evaluated=False)
    result.artifacts[1].jurisdiction = "Vietnam"
    data = report_data([result])
    assert data.labels == ["Vietnam (vietnam)", "Vietnam (india)"]


def test_report_reads_a_coordinators_data_directory_without_a_certificate(
    tmp_path: Path, evaluations: None
) -> None:
    data_dir = tmp_path / "coordinator"
    (data_dir / "rounds").mkdir(parents=True)
    for result in recorded_journal():
        record = pb.RoundRecord(result=result)
        path = data_dir / "rounds" / f"round-{result.round_num:06d}.json"
        path.write_text(message_to_json(record), encoding="utf-8")
    (data_dir / "consortium.json").write_text(json.dumps(IDENTITY), encoding="utf-8")

    ran = CliRunner().invoke(
        cli, ["report", "--journal", str(data_dir), "--out", str(tmp_path / "r")], env={}
    )

    assert ran.exit_code == 0, ran.output
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    page = _parse(html)
    assert [row[0] for row in page.tables["rounds"][1:]] == ["1", "2", "3", "4", "5"]
    assert "<dt>consortium</dt><dd>tapestry-demo</dd>" in html  # from its consortium.json
    assert f"<dt>model</dt><dd>{GPT_LINE}</dd>" in html
    assert page.tables["weights"][3] == ["5", "0.4000", "0.3000", "0.3000"]


def test_report_refuses_a_folder_that_is_not_a_coordinators_data_directory(
    tmp_path: Path,
) -> None:
    ran = CliRunner().invoke(
        cli, ["report", "--journal", str(tmp_path), "--out", str(tmp_path / "r")], env={}
    )
    assert ran.exit_code == 1
    assert f"{tmp_path} has no rounds/ folder: --journal takes a coordinator's --data-dir" in (
        ran.output
    )
