"""The training loop: one step = batch -> losses -> backward -> clip -> AdamW -> EMA; logging
and checkpoints at their intervals. Set up by `pretrain.train`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from pretrain import arch, checkpoint, optim
from pretrain.arch import SSLModel
from pretrain.config import TrainConfig
from pretrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.photometric import batch_to_device
from pretrain.logging_utils import MetricsLogger


def _reduced(
    terms: arch.LossTerms, streams: dict[int, dict[str, int]], device: torch.device
) -> dict:
    """Losses averaged over ranks; corrupt-input counts summed over this rank's loader streams
    (each DataLoader worker counts its own) and then over ranks."""
    losses = torch.stack([terms.total, terms.dino, terms.ibot, terms.koleo]).detach().float()
    counts = torch.tensor(
        [sum(s["corrupt_samples"] for s in streams.values()),
         sum(s["corrupt_tars"] for s in streams.values())], device=device,
    )  # fmt: skip
    dist.all_reduce(losses)
    dist.all_reduce(counts)
    losses /= dist.get_world_size()
    names = ("loss", "dino_loss", "ibot_loss", "koleo_loss")
    return {
        **dict(zip(names, losses.tolist())),
        "corrupt_samples": int(counts[0]),
        "corrupt_tars": int(counts[1]),
    }


def run_steps(
    cfg: TrainConfig,
    student: SSLModel,
    teacher: SSLModel,
    losses: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    schedules: optim.Schedules,
    loader: DataLoader,
    logger: MetricsLogger,
    start: int,
    meta: dict,
    device: torch.device,
    target: SSLModel | None = None,
) -> None:
    """Steps start..end (train.steps, or train.stop_after when set), checkpointing at `end`."""
    tc = cfg.train
    end = min(tc.steps, tc.stop_after) if tc.stop_after > 0 else tc.steps
    batches, images_since_log = iter(loader), 0
    stream_stats: dict[int, dict[str, int]] = {}  # latest running totals per loader stream
    params = [p for p in student.parameters() if p.requires_grad]
    backbone = optim.backbone_params(student)
    for step in range(start, end):
        batch = batch_to_device(next(batches), device, IMAGENET_MEAN, IMAGENET_STD)
        stream_stats[batch["stream"]] = batch["stream_stats"]
        values = schedules.at(step)
        optim.apply_step_values(optimizer, values)
        terms = arch.compute_losses(
            student, teacher, losses, batch, values.teacher_temp, cfg, target=target
        )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if schedules.backbone_frozen(step):  # heads only: train.freeze_backbone_steps
            optim.drop_grads(backbone)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        optimizer.step()
        arch.update_teacher(student, teacher, values.momentum)
        done = step + 1
        images_since_log += cfg.data.batch_size_per_rank * dist.get_world_size()
        if done % tc.log_every == 0 or done == end:
            record = _reduced(terms, stream_stats, device)
            record.update(
                vars(values),
                grad_norm=float(
                    grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                ),
            )
            logger.log(done, record, images_since_log)
            images_since_log = 0
        if done % tc.checkpoint_every == 0 or done == end:
            checkpoint.save_checkpoint(
                Path(cfg.output_dir) / "checkpoints", done, student=student, teacher=teacher,
                optimizer=optimizer, losses=losses, meta=meta, keep_last=cfg.checkpoint.keep_last,
            )  # fmt: skip
