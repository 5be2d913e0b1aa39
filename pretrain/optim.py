"""AdamW parameter groups and the DINOv2 schedules (lr, weight decay, EMA momentum, teacher temp).

Schedules are pure functions of the step, so a resumed run needs nothing but the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import OptimConfig, TrainRunConfig


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from `start` (step 0) to `end` (step `total`), flat after."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    if cfg.scaling_rule == "sqrt_wrt_1024":
        return cfg.base_lr * math.sqrt(global_batch / 1024.0)
    if cfg.scaling_rule == "linear_wrt_1024":
        return cfg.base_lr * global_batch / 1024.0
    return cfg.base_lr


@dataclass(frozen=True)
class StepValues:
    lr: float
    last_layer_lr: float
    wd: float
    momentum: float
    teacher_temp: float
    # The backbone's lr as a share of `lr`: 0 while it is frozen, then its own warm-up up to
    # optim.backbone_lr_mult.
    backbone_lr_scale: float = 1.0


class Schedules:
    """All per-step values of the recipe; epochs are `train.iterations_per_epoch` steps."""

    def __init__(self, optim: OptimConfig, train: TrainRunConfig, global_batch: int) -> None:
        self.cfg = optim
        self.total = train.steps
        ipe = train.iterations_per_epoch
        self.warmup = int(optim.warmup_epochs * ipe)
        self.freeze_last_layer = int(optim.freeze_last_layer_epochs * ipe)
        self.teacher_warmup = int(optim.warmup_teacher_temp_epochs * ipe)
        self.peak_lr = peak_lr(optim, global_batch)
        self.freeze_backbone = train.freeze_backbone_steps

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak_lr * step / self.warmup
        return cosine(step - self.warmup, self.total - self.warmup, self.peak_lr, self.cfg.min_lr)

    def teacher_temp(self, step: int) -> float:
        c = self.cfg
        if step < self.teacher_warmup:
            frac = step / self.teacher_warmup
            return c.warmup_teacher_temp + frac * (c.teacher_temp - c.warmup_teacher_temp)
        return c.teacher_temp

    def backbone_lr_scale(self, step: int) -> float:
        if step < self.freeze_backbone:
            return 0.0
        warmup = self.cfg.backbone_warmup_steps
        ramp = min(1.0, (step - self.freeze_backbone + 1) / warmup) if warmup else 1.0
        return self.cfg.backbone_lr_mult * ramp

    def backbone_frozen(self, step: int) -> bool:
        return step < self.freeze_backbone

    def at(self, step: int) -> StepValues:
        c = self.cfg
        lr = self.lr(step)
        return StepValues(
            lr=lr,
            last_layer_lr=0.0 if step < self.freeze_last_layer else lr,
            wd=cosine(step, self.total, c.weight_decay, c.weight_decay_end),
            momentum=cosine(step, self.total, c.momentum_teacher, c.final_momentum_teacher),
            teacher_temp=self.teacher_temp(step),
            backbone_lr_scale=self.backbone_lr_scale(step),
        )


def layer_id(name: str, n_blocks: int) -> int:
    """0 for the embeddings, i+1 for block i, n_blocks+1 for the final norm and the heads."""
    if not name.startswith("backbone."):
        return n_blocks + 1
    rest = name[len("backbone.") :]
    if rest.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
        return 0
    if rest.startswith("blocks."):
        return int(rest.split(".")[1]) + 1
    return n_blocks + 1


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norms and LayerScale gammas (all 1-D) keep their scale: no decay on them.
    return param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name


def param_groups(student: nn.Module, cfg: OptimConfig, n_blocks: int) -> list[dict]:
    """Groups keyed by (lr multiplier, wd multiplier, is last layer); frozen params left out."""
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = cfg.layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        if "patch_embed" in name:
            lr_mult *= cfg.patch_embed_lr_mult
        wd_mult = 0.0 if no_weight_decay(name, param) else 1.0
        last = "last_layer" in name
        backbone = name.startswith("backbone.")
        key = (lr_mult, wd_mult, last, backbone)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "lr_multiplier": lr_mult,
                "wd_multiplier": wd_mult,
                "is_last_layer": last,
                "is_backbone": backbone,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(student: nn.Module, cfg: OptimConfig, n_blocks: int) -> torch.optim.AdamW:
    groups = param_groups(student, cfg, n_blocks)
    if cfg.implementation == "fused":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), fused=True)
    # foreach=True keeps the step fast for DTensor params on CPU and GPU alike.
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), foreach=True)


def apply_step_values(optimizer: torch.optim.Optimizer, values: StepValues) -> None:
    for group in optimizer.param_groups:
        lr = values.last_layer_lr if group["is_last_layer"] else values.lr
        if group.get("is_backbone"):
            lr *= values.backbone_lr_scale
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values.wd * group["wd_multiplier"]


def backbone_params(student: nn.Module) -> list[nn.Parameter]:
    """The student backbone's trainable parameters (what train.freeze_backbone_steps holds)."""
    return [
        p for n, p in student.named_parameters() if n.startswith("backbone.") and p.requires_grad
    ]


def drop_grads(params: list[nn.Parameter]) -> None:
    """No gradient: AdamW then skips the parameter (no update, no decay, no state)."""
    for param in params:
        param.grad = None
