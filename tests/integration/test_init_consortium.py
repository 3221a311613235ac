"""The consortium `tapestry init` writes runs as its printed next steps say: the test runs
those very commands (each server told to report its port in a ready file as well), and a
round commits with every member."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from tapestry.cli import main
from tapestry.wire.grpc_plumbing import STOP_GRACE_S

from ..ports import free_ports

pytestmark = pytest.mark.slow  # whole consortia of training processes

START_TIMEOUT_S = 120.0


def _tapestry(command: str) -> list[str]:
    """A printed `tapestry ...` command, run by this interpreter."""
    program, *args = shlex.split(command)
    assert program == "tapestry"
    return [sys.executable, "-m", "tapestry", *args]


@contextmanager
def _serving(command: str, logs: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    ready = logs / f"{name}.ready"
    with open(logs / f"{name}.log", "wb") as log:
        server = subprocess.Popen(
            [*_tapestry(command), "--ready-file", str(ready)], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            assert server.poll() is None, (logs / f"{name}.log").read_text()
            assert time.monotonic() < deadline, f"{name} not ready"
            time.sleep(0.05)
        # The coordinator's port; a node's ready file says 0 once welcomed: it listens nowhere.
        assert (json.loads(ready.read_text())["port"] > 0) == (name == "coordinator")
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=STOP_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_printed_next_steps_serve_the_consortium_and_a_round_commits(tmp_path: Path) -> None:
    coordinator = free_ports(1)  # the one port: the nodes dial out
    out = tmp_path / "mine"
    init = CliRunner().invoke(
        main,
        ["init", "--out", str(out), "--node", "vietnam:Vietnam,india:India",
         "--coordinator-port", str(coordinator)],
    )  # fmt: skip
    assert init.exit_code == 0, init.output
    steps = [line.strip() for line in init.output.splitlines() if line.startswith("  tapestry ")]
    assert len(steps) == 4
    logs = tmp_path / "logs"
    logs.mkdir()
    with ExitStack() as servers:
        for name, command in zip(["coordinator", "vietnam", "india"], steps[:3], strict=True):
            servers.enter_context(_serving(command, logs, name))
        ran = subprocess.run(
            [*_tapestry(steps[3]), "--json"], capture_output=True, text=True, timeout=300
        )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["round_num"] == 1
    assert result["accepted_nodes"] == ["vietnam", "india"]
    assert "identity and model confirmed" in (logs / "coordinator.log").read_text()
