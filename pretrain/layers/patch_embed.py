"""Image to patch tokens: one strided convolution, as in ViT and DINOv2 (`patch_embed.proj`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Splits an image into non-overlapping `patch_size` squares and projects each to `embed_dim`."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        tokens = self.proj(images)  # [B, D, H/p, W/p]
        return torch.flatten(tokens, 2).transpose(1, 2)  # [B, N, D]
