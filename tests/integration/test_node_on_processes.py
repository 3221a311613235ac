"""A node whose training spans two CPU processes under ``torchrun`` (gloo), rank 0 serving
gRPC (issue 9 §5; docs/operating/torchrun.md).

Every process is stopped by its PID: the ranks are found as torchrun's children, and any
left when a test ends are killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec
from tapestry.training.consortium.models.state import model_state

from .conftest import write_corpora
from .ddp_cycle import cycle_node

HERE = Path(__file__).parent
TRAINING = {"local_epochs": 1, "lr": 0.01, "batch_size": 2, "max_seq_len": 64}
STOP_TIMEOUT_S = 20.0


def ranks_of(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the processes torchrun (``launcher_pid``) started."""
    found = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks = [v.removeprefix(b"RANK=") for v in environ if v.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = pid
    return found


def kill_left(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for torchrun's wait counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def two_process_node(tmp_path: Path) -> Iterator[Callable[[float], LocalConsortium]]:
    """Start a consortium whose one member is a node on two processes, with the given
    ``training.collective_timeout_s``; everything is stopped at the end, ranks by PID."""
    started: list[LocalConsortium] = []
    ranks: list[int] = []

    def start(collective_timeout_s: float = 30.0) -> LocalConsortium:
        corpus = write_corpora(tmp_path)["vietnam"]
        training = {**TRAINING, "collective_timeout_s": collective_timeout_s}
        spec = LocalNodeSpec("vietnam", "Vietnam", 0.9, [corpus], training, processes=2)
        # One member, so it takes the whole weight: the round commits on its delta alone.
        consortium = LocalConsortium(tmp_path / "c", [spec], policy={"max_node_weight": 1.0})
        started.append(consortium)
        consortium.start()
        ranks.extend(ranks_of(consortium.processes["vietnam"].popen.pid).values())
        return consortium

    try:
        yield start
    finally:
        for consortium in started:
            consortium.stop()
        kill_left(ranks)


def test_a_two_process_node_serves_a_round_and_stops_with_rank_0(
    two_process_node: Callable[[float], LocalConsortium],
) -> None:
    consortium = two_process_node(30.0)
    launcher = consortium.processes["vietnam"].popen
    ranks = ranks_of(launcher.pid)
    assert sorted(ranks) == [0, 1]

    with consortium.client() as client:
        result = client.run_round(timeout_s=60)

    assert list(result.accepted_nodes) == ["vietnam"], dict(result.failed_nodes)
    assert result.shared_base_sha256 != result.previous_base_sha256
    # The artifact is rank 0's, on disk as a one-process node keeps it, CPU float32.
    folder = consortium.node_data_dir("vietnam") / "artifacts" / "round-000001"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["rank_rows_min"] >= 1  # every rank trained
    stored = load_file(folder / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float32}
    assert {t.device.type for t in stored.values()} == {"cpu"}
    (contribution,) = result.contributions
    assert set(contribution.metrics) == {"loss", "world_size", "rank_rows_min"}
    assert "rank 1 of 2: round 1 trained" in consortium.log_tail("vietnam", 200)

    # SIGTERM to rank 0 alone: it drains, tells the worker to stop, and all exit cleanly.
    os.kill(ranks[0], signal.SIGTERM)
    assert launcher.wait(timeout=STOP_TIMEOUT_S) == 0
    assert not any(alive(pid) for pid in ranks.values())
    assert "rank 1 of 2: stopping, as rank 0 asked" in consortium.log_tail("vietnam", 200)


def test_a_stuck_worker_fails_the_cycle_within_the_collective_timeout(
    two_process_node: Callable[[float], LocalConsortium],
) -> None:
    consortium = two_process_node(2.0)
    ranks = ranks_of(consortium.processes["vietnam"].popen.pid)
    os.kill(ranks[1], signal.SIGSTOP)  # alive, but never joins a collective again
    try:
        with consortium.client() as client:
            stuck = client.run_round(timeout_s=60)
            again = client.run_round(timeout_s=60)
    finally:
        os.kill(ranks[1], signal.SIGKILL)

    for result in (stuck, again):
        assert list(result.accepted_nodes) == []
        assert result.shared_base_sha256 == result.previous_base_sha256
        reason = result.failed_nodes["vietnam"]
        assert "training.collective_timeout_s = 2 s; restart the node" in reason, reason


def _run_cycle_on_two_processes(out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "ddp_cycle.py"), str(out)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.mark.slow
def test_two_processes_repeat_bit_for_bit_and_differ_from_one_only_by_rounding(
    tmp_path: Path,
) -> None:
    runs = [tmp_path / "first.json", tmp_path / "second.json"]
    launched = [_run_cycle_on_two_processes(out) for out in runs]
    try:
        for process in launched:
            output, _ = process.communicate(timeout=60)
            assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    finally:
        kill_left([p.pid for p in launched if p.poll() is None])
    first, second = (json.loads(out.read_text()) for out in runs)

    assert first["trained_sha256"] == second["trained_sha256"]
    assert first["metrics"]["world_size"] == 2
    assert first["metrics"]["rank_rows_min"] >= 1
    assert {tuple(v) for v in first["delta"].values()} == {("torch.float32", "cpu")}
    # The same batches and the same steps as one process: equal up to summation order.
    node = cycle_node()
    alone = node.run_sovereign_cycle(1, {k: v.clone() for k, v in model_state(node.model).items()})
    for name, tensor in alone.artifact.model_state.items():
        together = torch.tensor(first["trained"][name]).reshape(tensor.shape)
        torch.testing.assert_close(together, tensor, rtol=0, atol=1e-5)
    assert first["metrics"]["loss"] == pytest.approx(alone.contribution.metrics["loss"], rel=1e-6)
