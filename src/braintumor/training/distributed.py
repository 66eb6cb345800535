"""Distributed data parallel set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job; a plain single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); no-op without torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all ranks (in place) when distributed; returns it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's Python object on every rank."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def average_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, so that every rank validates
    and checkpoints the same model; DDP only broadcasts them at the start of each forward pass."""
    if not info.enabled:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(info.world_size)


def run_on_main(fn, info: DistInfo):
    """Run ``fn`` on rank 0 only and give every rank its result; an error there is raised on every rank,
    so no rank waits forever for a result that will not come."""
    from braintumor.errors import UserError

    result, error, user_error = None, None, False
    if info.is_main:
        try:
            result = fn()
        except Exception as err:  # re-raised below, on rank 0 as itself
            if not info.enabled:
                raise
            error, user_error = err, isinstance(err, UserError)
    if not info.enabled:
        return result
    message = None if error is None else str(error)
    result, message, user_error = broadcast_object((result, message, user_error), info)
    if error is not None:
        raise error
    if message is not None:
        raise (UserError(message) if user_error else RuntimeError(f"rank 0 failed: {message}"))
    return result
