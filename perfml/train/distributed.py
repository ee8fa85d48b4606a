"""Distributed training through torchrun: process-group setup, DDP / FSDP2 wrapping, and the full
(unsharded) state dicts that rank 0 writes into a checkpoint.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 the process group is created
here (NCCL on CUDA, gloo on CPU), so one script serves `python -m perfml train` and
`torchrun --nproc_per_node N -m perfml train`.

Checkpoints hold the full state whatever the strategy: for FSDP2 the shards are gathered to rank 0
(torch.distributed.checkpoint.state_dict with full_state_dict and cpu_offload) and every rank loads
the full state back, keeping its own shard. A checkpoint therefore resumes under DDP, FSDP or a
single process alike, at the price of gathering the model on one host when saving, which is fine
up to a few billion parameters; sharded DCP files would be the next step beyond that.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from perfml.train.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> tuple[DistEnv, bool]:
    """The process's rank, world size and device; creates the process group when torchrun
    launched several processes and none exists. Returns (env, whether this call created it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device: cuda was asked for but no CUDA device is available")
        torch_device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    created = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        created = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world_size, local_rank, torch_device), created


def teardown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, env: DistEnv) -> nn.Module:
    """The module to train: the model itself in one process, else DDP- or FSDP2-wrapped. FSDP2
    shards each decoder layer, then the root (embedding, final norm, head) as one more group."""
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {strategy!r}")


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of accumulation micro-batches but the last."""
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights (on rank 0 under FSDP; other ranks get an empty dict)."""
    if not is_fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (not position) in every mode, so a checkpoint
    moves between one process, DDP and FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not is_fsdp(model):
        model.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
