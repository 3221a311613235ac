"""``tapestry demo``: a local consortium of real processes, three rounds over gRPC."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

from rich.console import Console

from tapestry.cli import report
from tapestry.cli.live import PlainProgress
from tapestry.demo import DEMO_NODES, DEMO_POLICY
from tapestry.launcher import LocalConsortium


def run_demo(
    round_count: int, workdir: Path, *, keep_running: bool = False, delta_encoding: str = "float32"
) -> None:
    """Start the local consortium, run ``round_count`` rounds and stop it; with
    ``keep_running``, write ``<workdir>/endpoints.json`` and leave it up until SIGINT or
    SIGTERM. ``delta_encoding`` is the consortium file's (how nodes send their deltas)."""
    out = report.console()
    out.print(
        f"Tapestry demo: coordinator + {len(DEMO_NODES)} nodes on 127.0.0.1 (work folder {workdir})"
    )
    with LocalConsortium(
        workdir,
        DEMO_NODES,
        consortium_id="tapestry-demo",
        policy=DEMO_POLICY,
        settings={"delta_encoding": delta_encoding},
    ) as consortium:
        for name, process in consortium.processes.items():
            out.print(f"  {name:<12} pid {process.popen.pid:<7} {process.address}")
        with consortium.client() as client:
            for _ in range(round_count):
                result = client.run_round(PlainProgress(out))
                out.print(report.round_table(result))
                out.print(report.artifacts_table(client.list_artifacts()))
        if keep_running:
            _serve_until_stopped(consortium, workdir, out)
    out.print(
        f"All processes stopped. The base and the sovereign models are kept under {workdir}/data."
    )


def _serve_until_stopped(consortium: LocalConsortium, workdir: Path, out: Console) -> None:
    endpoints = workdir.absolute() / "endpoints.json"
    tmp = endpoints.with_name(".endpoints.json.tmp")
    tmp.write_text(json.dumps(consortium.endpoints(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, endpoints)  # whoever waits for the file reads it whole
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    client = " ".join(f"{k}={v}" for k, v in consortium.cli_env().items())
    out.print(
        f"The consortium keeps running; addresses and credentials are in {endpoints}.\n"
        f"Try: {client} tapestry rounds --coordinator {consortium.coordinator_address}\n"
        "Press Ctrl-C (or send SIGTERM) to stop every process.",
        soft_wrap=True,  # a command to copy stays on one line
    )
    while not stop.wait(1.0):
        for name, process in consortium.processes.items():
            if process.popen.poll() is not None:
                out.print(f"{name} exited ({process.popen.returncode}); stopping the rest.")
                return
