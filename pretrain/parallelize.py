"""How the models run on many devices: process group, activation checkpointing, compile, FSDP2.

Order as in torchtitan: checkpoint-wrap blocks, then compile blocks, then `fully_shard` each
block, each head, then the root. Applied to student and teacher alike (teacher without
activation checkpointing: it runs without gradients, and always resharded after its forward).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pretrain.config import DistConfig

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: DistConfig) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (or make a 1-process one); returns (rank, world, device)."""
    if "RANK" not in os.environ:  # plain `python -m pretrain.train`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    use_cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def mixed_precision(cfg: DistConfig, device: torch.device) -> MixedPrecisionPolicy:
    mode = cfg.mixed_precision
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "fp32"
    if mode == "bf16":
        # bf16 compute, fp32 gradient reduction and fp32 sharded master weights.
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if mode == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(
        f"dist.mixed_precision must be auto, bf16 or fp32, got {cfg.mixed_precision!r}"
    )


def parallelize(
    model: nn.Module, cfg: DistConfig, device: torch.device, mesh: DeviceMesh, *, train: bool
) -> nn.Module:
    """Shard an SSLModel in place with FSDP2 (and optionally checkpoint/compile its blocks)."""
    model.to(device)
    policy = mixed_precision(cfg, device)
    # Settle "auto" attention on the real device before compile: it probes xformers once there.
    backend = model.backbone.resolve_attention(device, policy.param_dtype or torch.float32)
    if train:
        log.info("attention backend: %s", backend)
    blocks = model.backbone.blocks
    if cfg.activation_checkpointing and train:
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)
    if cfg.compile:
        for block in blocks:
            block.compile()
    # `reshard_after_forward=False` keeps the unsharded parameters registered until the
    # backward reshards them. The teacher has no backward: it would stay unsharded for good,
    # holding a full copy through the student's step, and `update_teacher` would write those
    # copies instead of the sharded weights (a shape error on 2+ ranks; on 1, the sharded
    # weights stayed the initial teacher's). Its next forward must all-gather anyway: the EMA
    # changed every shard.
    kwargs = {
        "mesh": mesh,
        "mp_policy": policy,
        "reshard_after_forward": cfg.reshard_after_forward if train else True,
    }
    for block in blocks:
        fully_shard(block, **kwargs)
    for head in (model.dino_head, model.ibot_head):
        if head is not None:
            fully_shard(head, **kwargs)
    fully_shard(model, **kwargs)
    return model


def build_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    return init_device_mesh(device.type, (world_size,))
