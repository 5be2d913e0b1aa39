"""One way to load a backbone from a file or a training run: `load_backbone(path_or_run_dir)`.

Accepts an official DINOv2 `.pth` (read with `torch.load(weights_only=True)`), a DINOv2-layout
`.safetensors` file (what `pretrain.train` exports), or a dinoforge training output directory
holding `teacher_backbone.safetensors`. The architecture (size, patch, registers, position grid,
feed-forward) is read off the weights; nothing is downloaded. The curation pipeline's embedder
and `pretrain.eval` both load through here. This module imports nothing of `pretrain` beyond
`pretrain.models` and `pretrain.layers` (a run's `config.yaml` is read as plain YAML).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from pretrain.models.vision_transformer import VisionTransformer
from pretrain.safe_yaml import load_yaml

logger = logging.getLogger(__name__)

EXPORT_NAME = "teacher_backbone.safetensors"  # what a training run writes at its end
DEFAULT_IMAGE_SIZE = 224  # DINOv2's evaluation crop, and TrainConfig's global crop size


@dataclass
class LoadedBackbone:
    model: VisionTransformer  # eval mode, fp32, on the CPU
    name: str  # architecture, e.g. "vit_large"
    embed_dim: int
    patch_size: int
    image_size: int  # native crop size: a run's global crop size; 224 for a weights file
    source: Path  # the weights file actually read (resolved)
    sha256: str  # hex SHA-256 of that file's bytes


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _run_global_crop_size(run_dir: Path) -> int:
    config = run_dir / "config.yaml"
    if not config.is_file():
        logger.warning("%s has no config.yaml: assuming %d px crops", run_dir, DEFAULT_IMAGE_SIZE)
        return DEFAULT_IMAGE_SIZE
    try:
        data = load_yaml(config.read_text(), config) or {}
        crops = data.get("crops") or {}
        return int(crops.get("global_crops_size", DEFAULT_IMAGE_SIZE))
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"{config}: cannot read crops.global_crops_size: {exc}") from exc


def weights_file(path_or_run_dir: str | os.PathLike) -> Path:
    """The weights file ``load_backbone`` would read (a run dir's export, or the file itself);
    FileNotFoundError naming what is missing. Cheap: callers check inputs with it up front."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        weights = path / EXPORT_NAME
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path} holds no {EXPORT_NAME}: export the run's teacher first with "
                f"`python -m pretrain.export --checkpoint {path}`"
            )
        return weights
    if path.is_file():
        return path
    raise FileNotFoundError(f"no backbone weights file or training run directory at {path}")


def load_backbone(
    path_or_run_dir: str | os.PathLike, *, attn_backend: str = "auto"
) -> LoadedBackbone:
    """The backbone in a DINOv2-layout weights file (.pth or .safetensors) or in a training run
    directory (its `teacher_backbone.safetensors`), strictly loaded, in eval mode, fp32, on the
    CPU. Errors name the file or directory: FileNotFoundError for a missing file or a run without
    an export, ValueError / KeyError for a file that is not a ViT state dict or does not match
    one (with hints: feed-forward type, register count, number of blocks)."""
    from pretrain.models import _backbone_from_file

    path = Path(path_or_run_dir)
    weights = weights_file(path)
    image_size = _run_global_crop_size(path) if path.is_dir() else DEFAULT_IMAGE_SIZE
    name, model = _backbone_from_file(weights, attn_backend)
    return LoadedBackbone(
        model=model.float().eval(),
        name=name,
        embed_dim=model.embed_dim,
        patch_size=model.patch_size,
        image_size=image_size,
        source=weights.resolve(),
        sha256=file_sha256(weights),
    )
