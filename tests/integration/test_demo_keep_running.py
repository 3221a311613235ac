"""`tapestry demo --keep-running`: the local consortium stays up for a user's own tools,
described in WORKDIR/endpoints.json, and every process stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.wire.grpc_plumbing import open_channel

pytestmark = pytest.mark.slow  # whole consortia of training processes

WAIT_S = 120.0


def _wait_for(path: Path, demo: subprocess.Popen[str]) -> dict:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert demo.poll() is None, demo.communicate()
        assert time.monotonic() < deadline, "endpoints.json never appeared"
        time.sleep(0.2)
    return json.loads(path.read_text(encoding="utf-8"))


def _credentials(described: dict, who: dict) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        Path(described["ca"]).read_bytes(),
        Path(who["key"]).read_bytes(),
        Path(who["cert"]).read_bytes(),
    )


def test_keep_running_describes_the_consortium_and_stops_on_sigterm(tmp_path):
    workdir = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "tapestry", "demo", "--rounds", "1", "--keep-running",
         "--workdir", str(workdir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        described = _wait_for(workdir / "endpoints.json", demo)
        nodes = ["vietnam", "switzerland", "india"]
        assert set(described) == {"coordinator", "nodes", "ca", "operator", "node_credentials"}
        assert list(described["nodes"]) == list(described["node_credentials"]) == nodes
        paths = [described["ca"], *described["operator"].values()] + [
            path for pair in described["node_credentials"].values() for path in pair.values()
        ]
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)

        # The operator reads the round the demo ran, over mutual TLS.
        operator = _credentials(described, described["operator"])
        coordinator = described["coordinator"]["address"]
        with open_channel(coordinator, operator) as channel:
            listed = pb_grpc.CoordinatorServiceStub(channel).ListRounds(pb.ListRoundsRequest())
        assert [r.round_num for r in listed.rounds] == [1]
        # The nodes listen nowhere: each holds its session, as a node's own credentials
        # read from the coordinator.
        assert all(described["nodes"][node_id]["address"] is None for node_id in nodes)
        for node_id in nodes:
            own = _credentials(described, described["node_credentials"][node_id])
            with open_channel(coordinator, own) as channel:
                stub = pb_grpc.CoordinatorServiceStub(channel)
                members = stub.ListMembers(pb.ListMembersRequest()).members
            assert [(m.node_id, m.connected) for m in members] == [(n, True) for n in nodes]
        # The CLI, as the file tells a user to call it.
        env = {
            **os.environ,
            "TAPESTRY_CA": described["ca"],
            "TAPESTRY_CERT": described["operator"]["cert"],
            "TAPESTRY_KEY": described["operator"]["key"],
        }
        ran = subprocess.run(
            [sys.executable, "-m", "tapestry", "round", "run", "--coordinator", coordinator],
            capture_output=True, text=True, timeout=WAIT_S, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert demo.poll() is None  # still up after being used

        demo.send_signal(signal.SIGTERM)
        out, _ = demo.communicate(timeout=WAIT_S)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0
    assert "endpoints.json" in out and "All processes stopped." in out
    for address in [coordinator]:
        with open_channel(address, operator) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=1)
            except grpc.FutureTimeoutError:
                continue
        raise AssertionError(f"{address} still answers after the demo stopped")


def _servers_of(workdir: Path) -> list[int]:
    """The pids of the servers whose command line names ``workdir`` (the demo's own
    process excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if b"serve" in command and any(str(workdir).encode() in part for part in command):
            found.append(int(entry.name))
    return found


def test_a_demo_killed_by_sigkill_leaves_no_server_behind(tmp_path):
    """Even a launcher that cannot clean up (SIGKILL) takes its servers with it: a node that
    dials out would otherwise go on dialing a coordinator that is gone."""
    workdir = tmp_path / "killed"
    demo = subprocess.Popen(
        [sys.executable, "-m", "tapestry", "demo", "--rounds", "1", "--keep-running",
         "--workdir", str(workdir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(workdir / "endpoints.json", demo)  # type: ignore[arg-type]
        assert len(_servers_of(workdir)) == 4  # the coordinator and three nodes
    finally:
        demo.kill()
        demo.wait()
    deadline = time.monotonic() + WAIT_S
    while (left := _servers_of(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
