"""Data-parallel training under ``torchrun``: PyTorch's DistributedDataParallel, NCCL on GPU, gloo on CPU.

``torchrun --nproc_per_node=N -m ltrepro train ...`` starts N processes; each reads its rank from
the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Every rank builds
the same plan from the same seed, so the models start equal (DDP also broadcasts rank 0's weights).
A stage's ``batch_size`` is the global batch: each training batch is drawn whole by every rank
from the same (seed, epoch) generator and each rank takes its contiguous share of it, so N
processes step through exactly the batches, augmentations and learning rates of one process,
with the gradient averaged over the global batch. What differs is batch-norm statistics, computed
over each rank's share unless ``distributed.sync_bn`` (GPU only), and float summation order.

Rank 0 alone decides which stages are reused or resumed, validates, selects and writes
checkpoints, reads the test set and logs to MLflow; the others train and follow its decisions,
which it sends them (``share``). Several nodes need the project folder on a shared filesystem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ltrepro.errors import LtreproError


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes; ``size`` 1 outside torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()
_world = SINGLE


def current() -> World:
    return _world


def start(device_name: str) -> World:
    """Join the process group torchrun's environment describes (a no-op without torchrun) and
    return this process's world; on CUDA each process takes GPU ``LOCAL_RANK``."""
    global _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or torch.distributed.is_initialized():
        return _world
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name == "cuda" and not cuda:
        raise LtreproError("device: 'cuda' was asked for but torch sees no CUDA device; use device=auto or cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise LtreproError(f"torchrun: local rank {local_rank} but only {torch.cuda.device_count()} GPUs here")
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    _world = World(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)
    return _world


def stop() -> None:
    global _world
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _world = SINGLE


def device_for(world: World, device: torch.device) -> torch.device:
    """Under torchrun on CUDA, this process's own GPU."""
    return torch.device("cuda", world.local_rank) if world.distributed and device.type == "cuda" else device


def share(value: Any, world: World | None = None) -> Any:
    """Rank 0's ``value`` on every rank (a decision: a run directory, a stage to skip); ``value``
    itself outside torchrun. The objects are small and pass only between this job's processes."""
    world = world or current()
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if current().distributed:
        torch.distributed.barrier()


def shard_window(start: int, stop: int, world: World) -> slice:
    """This rank's contiguous share of the global batch at positions [start, stop): sizes differ
    by at most one image, so a short last batch is spread over the ranks."""
    n = stop - start
    low = start + world.rank * n // world.size
    return slice(low, start + (world.rank + 1) * n // world.size)


def take(batch: Any, window: slice) -> Any:
    """Rows ``window`` of every tensor in a batch of any loader: a tensor, a tuple of views, a
    pair of streams, a named tuple of them. Slicing the batch, not the loader, leaves every
    loader (paired, two-stream, redrawn subsets) as it is; each rank augments the whole global
    batch, a small part of a step on device, but N times the decoding for images on disk."""
    if isinstance(batch, torch.Tensor):
        return batch[window]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(take(part, window) for part in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(take(part, window) for part in batch)
    raise LtreproError(f"torchrun: cannot split a training batch part of type {type(batch).__name__} across ranks")


class ObjectiveStep(nn.Module):
    """The model as DDP sees it: its forward is a whole objective call, because objectives reach
    into the model's parts (``features``, ``head``) rather than calling its ``forward``; DDP then
    averages the gradient of every parameter the objective used."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, objective: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return objective(self.model, *args)


def data_parallel(model: nn.Module, world: World, device: torch.device, sync_bn: bool) -> ObjectiveStep:
    """``model`` (in place: it stays the plan's model) behind DDP; batch norms synced when asked."""
    if sync_bn:
        if device.type != "cuda":
            raise LtreproError("distributed.sync_bn: SyncBatchNorm runs on CUDA only; set it false on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # find_unused_parameters: an objective may leave a part idle in a step (a head switched on later)
    return nn.parallel.DistributedDataParallel(
        ObjectiveStep(model), device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
        gradient_as_bucket_view=True,
    )
