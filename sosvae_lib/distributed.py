"""Multi-process training through torch.distributed (Langley et al., TMLR 2022, reproduced at scale).

Launch the ordinary command under ``torchrun --nproc_per_node=N``: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, `init_distributed` joins the process group (nccl on GPU, gloo on CPU), the model is
wrapped in DistributedDataParallel, a DistributedSampler gives each process its shard, and only rank 0 writes.
Without those variables everything reduces to one process (the same sampler with one replica).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from .devices import resolve_device  # noqa: F401 — the one device resolution, re-exported for its old callers


@dataclass
class DistContext:
    """Where this process stands: ``rank``, ``world_size``, ``local_rank``, its ``device``, whether it is the
    writer (``is_main``) and whether this module created the process group (``owns_group``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU); else a 1-process context.

    The device is `sosvae_lib.devices.resolve_device`'s: on CUDA each process takes the GPU of its LOCAL_RANK (a
    ValueError naming ``device`` when the node has fewer GPUs than processes, or when ``cuda:N`` would put every
    process on one GPU), checked before the process group is joined."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    dev = resolve_device(device, local_rank, world)
    if world <= 1:
        return DistContext(device=dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=dev, owns_group=owns)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group if `init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around ``module`` when running multi-process (parameters broadcast from rank 0)."""
    if not ctx.distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def make_sampler(dataset: Dataset, ctx: DistContext, seed: int, shuffle: bool = True) -> DistributedSampler:
    """A DistributedSampler (one replica when not distributed): the epoch's order depends only on (seed, epoch),
    which is what makes resumed runs exact. Call ``set_epoch`` each epoch."""
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                              drop_last=False)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``values`` over processes (identity when not distributed)."""
    if ctx.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
