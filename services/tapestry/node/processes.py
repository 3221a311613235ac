"""A node that spans processes: where it trains, joining ``torchrun``'s process group, and
the loop its worker ranks run.

``torchrun --nproc-per-node W -m tapestry node serve ...`` starts W copies of the command;
each reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment. Rank 0 serves
gRPC as a one-process node does; ranks above 0 serve nothing, and train their share of each
cycle when rank 0 posts it (:mod:`tapestry.training.consortium.local.distributed`), until rank 0
posts ``stop`` on its way out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from tapestry.errors import UserError
from tapestry.training.consortium.local.distributed import CYCLE, STOP, TrainingGroup
from tapestry.training.consortium.local.node import SovereignTrainingNode

log = logging.getLogger(__name__)


def training_device(setting: Literal["cpu", "cuda", "auto"], local_rank: int = 0) -> torch.device:
    """The device ``training.device`` names for the process of ``local_rank`` on its host.
    ``cuda`` without a usable GPU is a :class:`UserError`, raised before anything serves."""
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "cpu" or (setting == "auto" and found == 0):
        return torch.device("cpu")
    if found == 0:
        raise UserError(
            f'training.device = "cuda" but torch {torch.__version__} finds no CUDA device; '
            'set device = "cpu" or "auto"'
        )
    if local_rank >= found:
        raise UserError(
            f"training.device = {setting!r}: local rank {local_rank} has no GPU of its own "
            f"({found} found); start at most {found} processes per host"
        )
    return torch.device("cuda", local_rank)


def join_training_group(
    setting: Literal["cpu", "cuda", "auto"],
    timeout_s: float,
    env: Mapping[str, str] = os.environ,
) -> TrainingGroup | None:
    """This process's :class:`TrainingGroup` when started by ``torchrun`` with more than one
    process, else ``None``. Backend ``nccl`` on CUDA, ``gloo`` on the CPU; every
    collective fails after ``timeout_s`` instead of waiting for a lost rank forever."""
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    device = training_device(setting, local_rank)
    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous("env://", rank, world_size, timeout=timeout))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=PrefixStore("collectives", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    log.info("rank %d of %d: training on %s (backend %s)", rank, world_size, device, backend)
    return TrainingGroup(rank, world_size, device, PrefixStore("tapestry", store), timeout_s)


def serve_as_worker(node: SovereignTrainingNode, group: TrainingGroup) -> None:
    """A worker rank's life: train each cycle rank 0 posts, until it posts ``stop``. A cycle
    that fails (a rank lost, a collective past its timeout) ends the worker with the error:
    its group cannot train again, and ``torchrun`` then stops the node."""
    while True:
        command = group.next_command()
        if command == STOP:
            log.info("rank %d of %d: stopping, as rank 0 asked", group.rank, group.world_size)
            return
        verb, _, argument = command.partition(" ")
        if verb != CYCLE or not argument.isdigit():
            raise RuntimeError(f"rank {group.rank}: unknown command from rank 0: {command!r}")
        round_num = int(argument)
        loss = node.run_worker_cycle(round_num)
        log.info(
            "rank %d of %d: round %d trained, loss %.4f",
            group.rank,
            group.world_size,
            round_num,
            loss,
        )
