"""Multi-GPU and multi-node through torchrun: process group, samplers, DDP, reductions.

Everything here is a no-op in a single process, so the same stage code runs under ``python -m medctl``
and ``torchrun --nproc_per_node N -m medctl``. Rank 0 is the only writer of files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medctl.training.seed import seed_worker


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); True if joined.

    NCCL on CUDA (and the process's CUDA device is set to ``LOCAL_RANK``), gloo on CPU. With no torchrun
    environment, or a world of one, nothing is initialised.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool,
    *,
    shard: bool | None = None,
    collate_fn: Any = None,
) -> DataLoader:
    """A DataLoader whose order depends only on ``(seed, epoch)``.

    The sampler is always a ``DistributedSampler`` (with one replica outside torchrun): the shuffle of an
    epoch is drawn from ``seed + epoch`` once ``sampler.set_epoch(epoch)`` is called, which
    :func:`medctl.training.fit.fit` does, so a resumed run sees the same batches. ``shard`` (default: when
    distributed) splits the data across ranks; evaluation loaders that every rank should read whole pass
    ``shard=False``. Worker seeds come from the global torch RNG, which checkpoints save and restore;
    each worker seeds python's and numpy's RNGs from its own (:func:`~medctl.training.seed.seed_worker`).
    """
    shard = is_distributed() if shard is None else shard
    sampler = DistributedSampler(
        dataset,
        num_replicas=world_size() if shard else 1,
        rank=rank() if shard else 0,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # fresh worker seeds each epoch keep resumed runs identical
        worker_init_fn=seed_worker,
    )


def wrap_ddp(model: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed (on the local CUDA device), else ``model``.

    Pass ``find_unused_parameters=True`` when some parameters get no gradient in a step (a frozen encoder
    with trainable parts elsewhere, auxiliary heads switched off).
    """
    if not is_distributed():
        return model
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        return DistributedDataParallel(
            model, device_ids=[device], find_unused_parameters=find_unused_parameters
        )
    return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``torch.compile``'s), for state dicts and attribute access."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor); the tensor itself outside torchrun."""
    if not is_distributed():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / world_size()


def broadcast_bool(value: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's ``value`` on every rank (so every rank takes the same stop decision)."""
    if not is_distributed():
        return value
    flag = torch.tensor([1 if value else 0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def rank0_value(compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0 alone (e.g. building the cache); every rank returns rank 0's result."""
    return gather_objects(compute() if is_rank0() else None)[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` outside torchrun)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
