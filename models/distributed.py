"""Data-parallel plumbing with torch's own tools (torchrun + DDP; gloo on CPU, NCCL on CUDA).

Every helper is the identity in a single process, so the MED's code is the
same with one process or many. Features are gathered across ranks as BLIP
does (``concat_all_gather`` / ``all_gather_with_grad`` in the original):
ITC keys and queues see the global batch, and ITM hard negatives are drawn
from it, so that N processes compute what one process computes on the same
global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, on ``device``."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str | None = None) -> World:
    """Join the process group that torchrun (or a test's spawn) described in the environment.

    ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` unset means one process. ``device``
    ``None`` picks CUDA (one GPU per local rank) when present, else CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order), without gradient."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sends each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        size = grad.shape[0] // world_size()
        return grad[rank() * size:(rank() + 1) * size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``gather`` that lets the gradient flow back to the rank that owns each row."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left alone)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's ``value``."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (used to end an epoch together)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_objects(obj):
    """A list of ``obj`` from every rank (small picklable objects only)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
