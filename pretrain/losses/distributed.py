"""Collectives that degrade to the identity in a single process with no process group."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_(tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce across ranks; a no-op without a process group."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor
