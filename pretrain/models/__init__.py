"""Backbone factory and loader.

    build_backbone("vit_small", num_register_tokens=4)  # random weights
    load_backbone("dinov2_vitl14_pretrain.pth")  # or a .safetensors export, or a training run dir

Sizes as in DINOv2 (patch 14 by default): vit_small 384/12 layers/6 heads, vit_base 768/12/12,
vit_large 1024/24/16, vit_giant2 1536/40/24, and vit_test, a tiny model for tests and the CPU
demo. The feed-forward is a plain GELU MLP for every size but vit_giant2, which uses a fused
SwiGLU, as in the released DINOv2 checkpoints (ViT-L/14 included).

This package imports nothing else of `pretrain` but `pretrain.layers` (and `pretrain.configtools`
for atomic checkpoint writes): the curation pipeline
imports it to embed images.
"""

from __future__ import annotations

import os
from pathlib import Path

from pretrain.layers import resolve_attn_backend
from pretrain.models.dinov2_checkpoint import (
    CheckpointKeyError,
    dinov2_arch_from_state_dict,
    load_dinov2_state_dict,
    read_num_heads,
    read_state_dict,
)
from pretrain.models.loading import LoadedBackbone, load_backbone
from pretrain.models.vision_transformer import VisionTransformer, interpolate_pos_embed

ARCHS: dict[str, dict] = {
    "vit_test": {"embed_dim": 64, "depth": 4, "num_heads": 4, "ffn_layer": "mlp"},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "ffn_layer": "mlp"},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "ffn_layer": "mlp"},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "ffn_layer": "mlp"},
    "vit_giant2": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu"},
}


def build_backbone(
    name: str,
    *,
    patch_size: int = 14,
    num_register_tokens: int = 0,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    layerscale_init: float | None = 1e-5,
    ffn_layer: str | None = None,
    attn_backend: str = "auto",
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
    embed_dim: int = 0,
    depth: int = 0,
    num_heads: int = 0,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
) -> VisionTransformer:
    """interpolate_offset / interpolate_antialias default to DINOv2's released settings:
    0.1 / False, or 0.0 / True for models with register tokens. embed_dim, depth and num_heads
    override the arch's size when > 0."""
    if name not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(ARCHS)}")
    arch = ARCHS[name]
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim or arch["embed_dim"],
        depth=depth or arch["depth"],
        num_heads=num_heads or arch["num_heads"],
        ffn_layer=ffn_layer or arch["ffn_layer"],
        layerscale_init=layerscale_init,
        drop_path_rate=drop_path_rate,
        num_register_tokens=num_register_tokens,
        attn_backend=attn_backend,
        interpolate_offset=interpolate_offset,
        interpolate_antialias=interpolate_antialias,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )


def build_backbone_from_dinov2_checkpoint(
    path: str | os.PathLike, *, attn_backend: str = "auto"
) -> VisionTransformer:
    """A backbone whose size, patch, registers and feed-forward are read off a DINOv2-layout file
    (official or ours), with the weights loaded strictly. Errors name the file."""
    return _backbone_from_file(Path(path), attn_backend)[1]


def _backbone_from_file(path: Path, attn_backend: str) -> tuple[str, VisionTransformer]:
    """(arch name, strictly loaded backbone) of a DINOv2-layout file, read once."""
    resolve_attn_backend(attn_backend)  # a bad backend is not the file's fault
    state = read_state_dict(path)  # its errors name the file
    try:
        arch = dinov2_arch_from_state_dict(state, num_heads=read_num_heads(path))
        name = arch.pop("name")
        model = build_backbone(name, attn_backend=attn_backend, **arch)
        load_dinov2_state_dict(model, state)
    except KeyError as exc:
        raise CheckpointKeyError(f"{path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return name, model


__all__ = [
    "ARCHS",
    "LoadedBackbone",
    "load_backbone",
    "VisionTransformer",
    "build_backbone",
    "build_backbone_from_dinov2_checkpoint",
    "interpolate_pos_embed",
]
