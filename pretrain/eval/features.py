"""Backbones to evaluate and their frozen features."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2

from pretrain.data import IMAGENET_MEAN, IMAGENET_STD
from pretrain.models import build_backbone, load_backbone
from pretrain.models.loading import EXPORT_NAME

logger = logging.getLogger(__name__)


def backbone_for_eval(
    checkpoint: str | None, *, random_init: bool = False, model: str = "vit_test", seed: int = 0
) -> tuple[nn.Module, int]:
    """(backbone in eval mode, its native image size) from a run dir or a weights file (through
    `pretrain.models.load_backbone`), or with random weights: the run's geometry when a run dir
    is given (the fair baseline), else `model` at 224 px."""
    if random_init:
        torch.manual_seed(seed)
        backbone, size = build_backbone(model), 224
        if checkpoint:  # the run's geometry, random weights: the fair baseline
            from pretrain.export import backbone_from_config, run_config

            cfg = run_config(checkpoint)
            backbone, size = backbone_from_config(cfg), cfg.crops.global_crops_size
        return backbone.eval(), size
    if checkpoint is None:
        raise ValueError(
            "give --checkpoint (a training output dir or a weights file) or --random-init"
        )
    if Path(checkpoint).is_dir() and not (Path(checkpoint) / EXPORT_NAME).is_file():
        fallback = _unexported_run_backbone(Path(checkpoint))
        if fallback is not None:
            return fallback
    loaded = load_backbone(checkpoint)
    return loaded.model, loaded.image_size


def _unexported_run_backbone(run_dir: Path) -> tuple[nn.Module, int] | None:
    """A run stopped before its export: the teacher of its latest DCP checkpoint, or None."""
    from pretrain.checkpoint import latest_checkpoint

    if latest_checkpoint(run_dir / "checkpoints") is None:
        return None  # load_backbone raises, with the hint to export
    from pretrain.export import load_teacher_backbone, run_config

    logger.info("%s has no %s: reading its latest checkpoint", run_dir, EXPORT_NAME)
    backbone = load_teacher_backbone(run_dir)
    return backbone.float().eval(), run_config(run_dir).crops.global_crops_size


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
