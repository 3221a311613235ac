"""The ``tapestry`` command as a user runs it: real processes, real servers on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tapestry.config import write_config
from tapestry.coordinator.client import CoordinatorClient
from tapestry.demo.launcher import LocalConsortium
from tapestry.wire.status import COORDINATOR

from .conftest import POLICY, node_specs
from .fake_nodes import BlockingNode, serve

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
WAIT_S = 120.0


def _tapestry(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tapestry", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, **env},
        # As from a terminal: a shell's background job (CI, say) would pass SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.slow
def test_ctrl_c_during_round_run_says_the_round_goes_on_and_it_commits(tmp_path):
    """The round is held open by a member that does not answer until the test lets it go,
    so Ctrl-C certainly arrives while the round runs, however loaded the machine."""
    blocking = BlockingNode("slow")
    with (
        serve([blocking]) as members,
        LocalConsortium(
            tmp_path, node_specs(tmp_path), policy=POLICY, extra_members=members, tls=False
        ) as consortium,
    ):
        address = consortium.coordinator_address
        run = _tapestry("round", "run", "--coordinator", address, env=consortium.cli_env())
        try:
            assert blocking.started.wait(timeout=WAIT_S), "the round never reached the member"
            run.send_signal(signal.SIGINT)
            _, stderr = run.communicate(timeout=WAIT_S)
        finally:
            blocking.release.set()
            if run.poll() is None:
                run.kill()
                run.wait()

        assert run.returncode == 130
        assert stderr.strip() == (
            "Interrupted: stopped following the round. A round that has started keeps running "
            f"on the coordinator at {address} and commits on its own; see its result with "
            f"`tapestry rounds --coordinator {address}`."
        )
        # Nobody listens any more; the round still runs to its commit.
        with CoordinatorClient(address) as client:
            deadline = time.monotonic() + WAIT_S
            while not (rounds := client.list_rounds()):
                assert time.monotonic() < deadline, "the round never committed"
                time.sleep(0.2)
        assert [r.round_num for r in rounds] == [1]
        assert sorted(rounds[0].accepted_nodes) == ["india", "slow", "switzerland", "vietnam"]


@pytest.mark.slow
def test_a_node_address_given_as_the_coordinator_is_named_as_a_node(tmp_path):
    with LocalConsortium(
        tmp_path, node_specs(tmp_path)[:2], policy=POLICY, dial_out=False
    ) as consortium:
        node = consortium.processes["vietnam"].address
        ran = subprocess.run(
            [sys.executable, "-m", "tapestry", "rounds", "--coordinator", node],
            capture_output=True,
            text=True,
            env={**ENV, **consortium.cli_env()},
            timeout=WAIT_S,
        )
    assert ran.returncode == 1
    assert ran.stderr.strip() == (
        f"Error: {node} is not a Tapestry coordinator: it does not serve "
        f"{COORDINATOR.service_name} (UNIMPLEMENTED: Method not found!). Is this the right "
        "address? If not, pass the coordinator's address with --coordinator HOST:PORT."
    )


def test_a_node_on_a_port_in_use_exits_with_one_line_and_no_traceback(tmp_path):
    spec = node_specs(tmp_path)[0]
    # Only to write the file of a node that listens.
    local = LocalConsortium(tmp_path, [spec], tls=False, dial_out=False)
    config = write_config(local.node_config_path("vietnam"), local.node_config(spec))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        node = _tapestry(
            "node", "serve", "--config", str(config), "--data-dir", str(tmp_path / "data"),
            "--listen", f"127.0.0.1:{port}", "--insecure", env={},
        )  # fmt: skip
        try:
            _, stderr = node.communicate(timeout=WAIT_S)
        finally:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert node.returncode == 1
    assert "Traceback" not in stderr
    assert "add_port" not in stderr  # gRPC's own log line: the bind is checked before gRPC's
    assert stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port}: the address is already in use — another "
        f"process (perhaps another Tapestry server) holds port {port}; stop it or choose "
        "another address with --listen HOST:PORT (port 0 picks a free port)"
    )
