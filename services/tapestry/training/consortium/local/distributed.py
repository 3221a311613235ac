"""A node's local training across several processes (``torchrun``, DDP): which rows each
rank trains on, the training step that keeps every rank in step, and how rank 0 tells its
workers what to do.

The rule (docs/operating/torchrun.md): ``training.batch_size`` stays the
*global* batch, and the batches are the single-process node's, drawn from the same seeded
permutation (every rank holds the whole corpus and the same generator). Rank ``r`` of ``W``
trains on rows ``r, r + W, r + 2W, …`` of each global batch (:func:`shard_rows`), with no
padding and no repeated row, so the union of the ranks' rows is exactly the batch and a rank
may get none (it still joins the all-reduce with a zero gradient). Each rank's summed loss
is divided by the *global* batch's number of real target tokens, so after DDP's averaged
all-reduce the gradient is the single-process gradient of the batch's mean loss; the optimiser
takes the same steps with the same hyper-parameters. Results then differ from a one-process
node only by floating-point summation order (not bit-identical), and a run with the same
number of processes repeats bit for bit.

Commands go through the rendezvous store, not through a collective: a worker may wait hours
for the next round, past any collective timeout, and a store wait costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from threading import Lock

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.distributed_c10d import Store
from torch.nn.parallel import DistributedDataParallel

from tapestry.errors import UserError
from tapestry.training.consortium.local.evaluation import IGNORE_INDEX, next_token_loss

log = logging.getLogger(__name__)

STOP = "stop"
CYCLE = "cycle"
# A worker re-arms its wait for rank 0's next command this often; a round may be days
# away, and c10d logs a line each time a wait runs out, so the period is long.
COMMAND_WAIT = timedelta(hours=1)


class TrainingGroupLost(UserError, RuntimeError):
    """A cycle across processes failed (a rank died, or was stuck past the collective
    timeout): the group is out of step for good, so every later cycle is refused at once
    until the node (all its ranks) is restarted."""


def shard_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The rows of ``batch`` (1-D row indices) that rank ``rank`` of ``world_size`` trains:
    every ``world_size``-th from position ``rank`` (DistributedSampler's stride, within one
    batch and without padding). Disjoint across ranks, together exactly ``batch``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return batch[rank::world_size]


@dataclass
class TrainingGroup:
    """This process's place in its node's process group (already initialised).

    ``commands`` is a store every rank shares: rank 0 posts numbered commands there
    (:meth:`post`), workers take them in order (:meth:`next_command`). ``timeout_s`` is
    the collectives' timeout, named when a cycle fails on it. ``lost`` says why the group
    cannot train any more, once a cycle has failed."""

    rank: int
    world_size: int
    device: torch.device
    commands: Store
    timeout_s: float
    lost: str | None = None
    _posted: int = 0
    _taken: int = 0
    _posting: Lock = field(default_factory=Lock)

    @property
    def is_worker(self) -> bool:
        return self.rank > 0

    def post(self, command: str) -> None:
        """Rank 0: post ``command`` (``"cycle N"`` or ``"stop"``) for every worker; a cycle
        is refused once the group is lost."""
        if self.lost is not None and command != STOP:
            raise TrainingGroupLost(self.lost)
        with self._posting:
            self._posted += 1
            # Kept, never deleted: a worker that fell behind (its cycle failed) still finds
            # every command, stop included; a few bytes a round in the launcher's store.
            self.commands.set(f"command/{self._posted}", command)

    def next_command(self) -> str:
        """A worker: rank 0's next command, waiting for it as long as it takes."""
        key = f"command/{self._taken + 1}"
        while True:
            try:
                self.commands.wait([key], COMMAND_WAIT)
                break
            except dist.DistStoreError as error:
                if "timeout" not in str(error).lower():
                    raise  # the store is gone with rank 0's launcher
        self._taken += 1
        value: bytes = self.commands.get(key)
        return value.decode()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP. Construction broadcasts rank 0's parameters and buffers,
        which is how the round's base reaches the workers."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


def train_sharded(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    group: TrainingGroup,
) -> tuple[float, int]:
    """Train ``model`` on this rank's share of every batch (module docstring); returns
    ``(mean loss over the steps, the fewest rows any rank trained on)``, the same on every
    rank. ``inputs``/``targets`` are the whole padded corpus, on ``group.device``.

    Any failure on the way leaves the ranks out of step: it marks the group lost and
    raises :class:`TrainingGroupLost`, which says why and what to do."""
    try:
        return _train_sharded(model, batches, inputs, targets, optimizer, group)
    except Exception as error:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        group.lost = (
            f"training across the node's {group.world_size} processes failed on rank "
            f"{group.rank}: a rank died, or was stuck past training.collective_timeout_s = "
            f"{group.timeout_s:g} s; restart the node (every rank). Cause: {cause}"
        )
        raise TrainingGroupLost(group.lost) from error


def _train_sharded(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    group: TrainingGroup,
) -> tuple[float, int]:
    ddp = group.wrap(model)
    sums: list[torch.Tensor] = []
    counts: list[int] = []
    rows = 0
    for batch in batches:
        mine = shard_rows(batch, group.rank, group.world_size)
        count = int((targets[batch] != IGNORE_INDEX).sum())  # the global batch's targets
        logits = ddp(inputs[mine])  # (b, T, V), b may be 0
        local = next_token_loss(logits, targets[mine], reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        # DDP averages over ranks: scaling by W / count makes that the batch's mean loss.
        torch.autograd.backward(local * (group.world_size / count))
        optimizer.step()
        sums.append(local.detach())
        counts.append(count)
        rows += len(mine)
    per_rank = torch.zeros(group.world_size, dtype=torch.float64, device=group.device)
    per_rank[group.rank] = rows
    totals = torch.cat([torch.stack(sums).to(torch.float64), per_rank])
    dist.all_reduce(totals)  # every rank's summed losses per step, and its rows
    losses = totals[: len(sums)].cpu() / torch.tensor(counts, dtype=torch.float64)
    fewest = int(totals[len(sums) :].min())
    return float(losses.mean()), fewest
