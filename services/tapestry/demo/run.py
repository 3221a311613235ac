"""``tapestry demo``: a local consortium of real processes, three rounds over gRPC."""

from __future__ import annotations

from pathlib import Path

from tapestry.cli import report
from tapestry.demo import DEMO_NODES, DEMO_POLICY
from tapestry.launcher import LocalConsortium


def run_demo(round_count: int, workdir: Path) -> None:
    out = report.console()
    out.print(
        f"Tapestry demo: coordinator + {len(DEMO_NODES)} nodes on 127.0.0.1 (work folder {workdir})"
    )
    with LocalConsortium(
        workdir, DEMO_NODES, consortium_id="tapestry-demo", policy=DEMO_POLICY
    ) as consortium:
        for name, process in consortium.processes.items():
            out.print(f"  {name:<12} pid {process.popen.pid:<7} {process.address}")
        with consortium.client() as client:
            for _ in range(round_count):
                result = client.run_round(lambda e: out.print(report.progress_line(e)))
                out.print(report.round_table(result))
                out.print(report.artifacts_table(client.list_artifacts()))
    out.print(
        f"All processes stopped. The base and the sovereign models are kept under {workdir}/data."
    )
