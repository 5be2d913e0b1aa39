"""Backbones to evaluate and their frozen features."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

from pretrain.data import IMAGENET_MEAN, IMAGENET_STD
from pretrain.models import build_backbone
from pretrain.models.dinov2_checkpoint import dinov2_arch_from_state_dict, read_state_dict


def load_backbone(
    checkpoint: str | None, *, random_init: bool = False, model: str = "vit_test", seed: int = 0
) -> tuple[nn.Module, int]:
    """(backbone in eval mode, its native image size) from a run dir, a weights file, or random."""
    if random_init:
        torch.manual_seed(seed)
        backbone, size = build_backbone(model), 224
        if checkpoint:  # the run's geometry, random weights: the fair baseline
            from pretrain.export import backbone_from_config, run_config

            cfg = run_config(checkpoint)
            backbone, size = backbone_from_config(cfg), cfg.crops.global_crops_size
    elif checkpoint is None:
        raise ValueError(
            "give --checkpoint (a training output dir or a weights file) or --random-init"
        )
    elif Path(checkpoint).is_dir():
        from pretrain.export import load_teacher_backbone, run_config

        backbone = load_teacher_backbone(checkpoint)
        size = run_config(checkpoint).crops.global_crops_size
    else:
        state = read_state_dict(checkpoint)
        kwargs = dinov2_arch_from_state_dict(state)
        backbone = build_backbone(kwargs.pop("name"), **kwargs)
        backbone.load_dinov2_checkpoint(checkpoint)
        size = kwargs["img_size"]
    return backbone.eval(), size


def eval_transform(size: int) -> v2.Transform:
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: list[Image.Image],
    size: int,
    *,
    n_last_blocks: int = 1,
    avgpool: bool = False,
    batch_size: int = 64,
) -> Tensor:
    """[N, D * n_last_blocks (+ D)] features: CLS of the last blocks (+ mean patch token)."""
    transform = eval_transform(size)
    device = next(backbone.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([transform(img) for img in images[start : start + batch_size]]).to(device)
        if n_last_blocks == 1 and not avgpool:
            out.append(backbone(x).float())
            continue
        layers = backbone.get_intermediate_layers(x, n=n_last_blocks, return_class_token=True)
        feats = [cls for _, cls in layers]  # n_last_blocks x [B, D]
        if avgpool:
            feats.append(layers[-1][0].mean(dim=1))  # [B, N, D] -> [B, D]
        out.append(torch.cat(feats, dim=-1).float())
    return torch.cat(out)
