"""Building blocks of the backbone and the projection head."""

from pretrain.layers.attention import ATTN_BACKENDS, Attention, resolve_attn_backend
from pretrain.layers.block import Block, DropPath, LayerScale
from pretrain.layers.dino_head import DINOHead
from pretrain.layers.ffn import Mlp, SwiGLUFFN, swiglu_hidden_features
from pretrain.layers.patch_embed import PatchEmbed

__all__ = [
    "ATTN_BACKENDS",
    "Attention",
    "Block",
    "DINOHead",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "resolve_attn_backend",
    "swiglu_hidden_features",
]
