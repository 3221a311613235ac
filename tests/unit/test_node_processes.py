"""A node's training device and the rule that shares each batch among its processes (issue 9
§5; docs/operating/torchrun.md). The processes themselves are exercised in
tests/integration/test_node_on_processes.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.distributed import HashStore
from torch.distributed.distributed_c10d import Store

from tapestry.cli import main
from tapestry.config import ConfigError, NodeConfig, TrainingConfig, build_config
from tapestry.errors import UserError
from tapestry.node.processes import join_training_group, serve_as_worker, training_device
from tapestry.training.consortium.local.distributed import (
    STOP,
    TrainingGroup,
    TrainingGroupLost,
    shard_rows,
)

CORPUS = Path(__file__).parents[2] / "services" / "tapestry" / "demo" / "corpora" / "vietnam.txt"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 2, 5, 8])
def test_the_ranks_rows_are_disjoint_and_together_exactly_the_batch(
    world_size: int, size: int
) -> None:
    batch = torch.randperm(size, generator=torch.Generator().manual_seed(size))
    shards = [shard_rows(batch, rank, world_size) for rank in range(world_size)]

    assert sorted(torch.cat(shards).tolist()) == sorted(batch.tolist())
    assert [len(s) for s in shards] == [len(range(r, size, world_size)) for r in range(world_size)]


def test_rank_r_takes_every_world_size_th_row_from_position_r() -> None:
    batch = torch.tensor([40, 41, 42, 43, 44])

    assert shard_rows(batch, 0, 2).tolist() == [40, 42, 44]
    assert shard_rows(batch, 1, 2).tolist() == [41, 43]
    assert shard_rows(batch[:1], 1, 2).tolist() == []  # a rank may get no row of a batch


def test_a_rank_outside_the_group_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard_rows(torch.arange(4), 2, 2)


def test_training_runs_on_the_cpu_unless_the_config_says_otherwise() -> None:
    assert TrainingConfig().device == "cpu"
    assert training_device("cpu") == torch.device("cpu")


def test_auto_picks_the_cpu_without_a_gpu_and_the_local_ranks_gpu_with_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto") == torch.device("cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert training_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="local rank 2 has no GPU of its own"):
        training_device("cuda", local_rank=2)


def test_auto_picks_the_cpu_on_this_machine_when_it_has_no_gpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training_device("auto").type == expected


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as refused:
        training_device("cuda")
    assert str(refused.value) == (
        f'training.device = "cuda" but torch {torch.__version__} finds no CUDA device; '
        'set device = "cpu" or "auto"'
    )


def test_an_unknown_device_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"training\.device: Input should be 'cpu', 'cuda'"):
        build_config(
            NodeConfig,
            {
                "node_id": "vietnam",
                "jurisdiction": "Vietnam",
                "consortium_id": "c",
                "quality_score": 0.9,
                "corpus": [CORPUS],
                "training": {"device": "tpu"},
            },
            "node.toml",
        )


def test_one_process_joins_no_group() -> None:
    assert join_training_group("cpu", 30.0, env={}) is None
    assert join_training_group("cpu", 30.0, env={"WORLD_SIZE": "1", "RANK": "0"}) is None


def test_node_serve_with_cuda_and_no_gpu_stops_at_start_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this machine
    config = tmp_path / "node.toml"
    config.write_text(
        f'node_id = "vietnam"\njurisdiction = "Vietnam"\nconsortium_id = "c"\n'
        f'quality_score = 0.9\ncorpus = ["{CORPUS}"]\n[training]\ndevice = "cuda"\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(
        main,
        ["node", "serve", "--config", str(config), "--data-dir", str(tmp_path / "data")],
        env={"TAPESTRY_INSECURE": "1"},
    )

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f'Error: training.device = "cuda" but torch {torch.__version__} finds no CUDA device; '
        'set device = "cpu" or "auto"'
    ]
    assert not (tmp_path / "data").exists()  # refused before anything was written


def _group(rank: int, store: Store) -> TrainingGroup:
    return TrainingGroup(rank, 2, torch.device("cpu"), store, timeout_s=5.0)


def test_workers_take_rank_0s_commands_in_order_even_when_behind() -> None:
    store = HashStore()
    rank0, worker = _group(0, store), _group(1, store)
    rank0.post("cycle 1")
    assert worker.next_command() == "cycle 1"
    rank0.post("cycle 2")
    rank0.post(STOP)

    assert [worker.next_command(), worker.next_command()] == ["cycle 2", STOP]


def test_a_lost_group_refuses_every_later_cycle_but_still_stops() -> None:
    store = HashStore()
    rank0 = _group(0, store)
    rank0.lost = "training across the node's 2 processes failed on rank 0: ..."

    with pytest.raises(TrainingGroupLost, match="failed on rank 0"):
        rank0.post("cycle 3")
    rank0.post(STOP)
    assert _group(1, store).next_command() == STOP


def test_a_worker_ends_at_stop_and_refuses_a_command_it_does_not_know() -> None:
    store = HashStore()
    rank0, worker = _group(0, store), _group(1, store)
    rank0.post(STOP)
    serve_as_worker(None, worker)  # type: ignore[arg-type]  # returns without training

    rank0.post("rewind 3")
    with pytest.raises(RuntimeError, match="unknown command from rank 0: 'rewind 3'"):
        serve_as_worker(None, worker)  # type: ignore[arg-type]
