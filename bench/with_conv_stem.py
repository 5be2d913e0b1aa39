"""Run a bench script with the ViT's patch embedding swapped for a small convolutional stem.

An experiment harness for docs/training.md ("The silhouettes check"), not a model option:
it asks whether a convolution's prior in the first layers (Xiao et al. 2021, "Early
convolutions help transformers see better") is what the plain 8 px patch projection lacks on
the silhouettes stand-in. The stem is 3x3 stride-2 convolutions (16, 32, 64 channels for 8 px
patches), each followed by a norm and ReLU, then a 1x1 projection to the embedding width: the
same token grid as the patch embedding it replaces. GroupNorm by default: the EMA teacher copies
parameters, not BatchNorm's running statistics.

    python bench/with_conv_stem.py bench/supervised_ceiling.py --data silhouettes --steps 800 \\
        --lr 1e-3 crops.blur_probs=[0,0,0] crops.color_jitter_prob=0 crops.grayscale_prob=0 \\
        crops.solarize_prob=0
    python bench/with_conv_stem.py bench/learns_shapes.py --data silhouettes --images 8000 \\
        --steps 1200 --eval-every 400 --lr 0.004 --config configs/pretrain/vit_tiny_cpu.yaml
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain.models.vision_transformer as vision_transformer  # noqa: E402

STEM_NORM = os.environ.get("STEM_NORM", "group")  # group | batch


class ConvStem(nn.Module):
    """[B, 3, H, W] -> [B, H/p * W/p, D] through log2(p) stride-2 conv blocks."""

    def __init__(self, patch_size: int = 8, in_chans: int = 3, embed_dim: int = 64) -> None:
        super().__init__()
        stages = patch_size.bit_length() - 1
        if patch_size != 1 << stages or stages < 1:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        channels = in_chans
        for stage in range(stages):
            width = min(16 << stage, 4 * embed_dim)
            norm = nn.GroupNorm(4, width) if STEM_NORM == "group" else nn.BatchNorm2d(width)
            layers += [nn.Conv2d(channels, width, 3, 2, 1, bias=False), norm, nn.ReLU()]
            channels = width
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, embed_dim, 1)

    def forward(self, images: Tensor) -> Tensor:
        return torch.flatten(self.proj(self.stem(images)), 2).transpose(1, 2)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python bench/with_conv_stem.py SCRIPT [its arguments]")
    vision_transformer.PatchEmbed = ConvStem
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
