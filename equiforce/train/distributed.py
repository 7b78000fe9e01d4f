"""Multi-process training through PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

``torchrun --nproc_per_node 4 -m equiforce.cli train config.yaml`` starts one process per GPU (or CPU
worker with the gloo backend); each trains on every ``world``-th batch of the same shuffled epoch and
DDP averages the gradients.  Everything that decides the course of training — the learning rate, the
time budget, stage two, the best model — is computed from values all ranks share (rank 0's clock,
all-reduced losses and metrics), so the replicas can never drift apart.  Only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``world == 1`` means plain single-process training."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device_type: str) -> Ranks:
    """Join the process group torchrun describes in the environment (idempotent); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        atexit.register(_leave_group)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _leave_group() -> None:
    """Destroy the process group before the interpreter tears down: a group left to the C++ destructors at exit
    can abort a rank ("terminate called without an active exception", seen with gloo on CPU)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def joined() -> Ranks:
    """This process's place in the job, without joining a process group: the group's where the trainer joined
    one, else what torchrun put in the environment (a step that trains nothing, e.g. heads on a given backbone,
    still runs once per rank, and only rank 0 may write)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def write_on_main(write: Callable[[], object]) -> None:
    """Call ``write`` on rank 0 only (one writer of a shared file) and let the other ranks wait until it is done."""
    ranks = joined()
    if ranks.main:
        write()
    barrier(ranks)


def device_for(ranks: Ranks, device: torch.device) -> torch.device:
    """One GPU per local rank; CPU stays CPU."""
    if device.type == "cuda" and ranks.active:
        torch.cuda.set_device(ranks.local_rank)
        return torch.device("cuda", ranks.local_rank)
    return device


def shard(batches: list[list[int]], ranks: Ranks) -> list[list[int]]:
    """This rank's batches: every ``world``-th, wrapped around so all ranks take the same number of steps."""
    if not ranks.active:
        return batches
    steps = -(-len(batches) // ranks.world)
    return [batches[(step * ranks.world + ranks.rank) % len(batches)] for step in range(steps)]


def shared_clock(seconds: float, ranks: Ranks, device: torch.device) -> float:
    """Rank 0's elapsed time, so budget, schedule and stage decisions are identical on every rank."""
    if not ranks.active:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.broadcast(value, src=0)
    return float(value.item())


def all_sum(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum over ranks (in place on a copy); identity for one process."""
    if not ranks.active:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (where a process group was joined; without one there is nothing to wait with)."""
    if ranks.active and dist.is_available() and dist.is_initialized():
        dist.barrier()
