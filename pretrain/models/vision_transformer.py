"""The DINOv2 Vision Transformer backbone.

Parameter names follow the official DINOv2 release (`patch_embed.proj`, `cls_token`, `pos_embed`,
`register_tokens`, `mask_token`, `blocks.{i}.…`, `norm`), so official checkpoint files load
without renaming (see `pretrain.models.dinov2_checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pretrain.layers import Block, PatchEmbed, resolve_attn_backend


def interpolate_pos_embed(
    pos_embed: Tensor, target_hw: tuple[int, int], offset: float = 0.1, antialias: bool = False
) -> Tensor:
    """Bicubically resamples a square grid of patch position embeddings to `target_hw` patches.

    pos_embed is [1, 1 + M*M, D] with the CLS position first. `offset` reproduces DINOv2's
    `interpolate_offset` (it passes scale factors (n + offset) / M rather than an output size,
    which shifts the sampling grid slightly); offset 0 resizes to the exact size. DINOv2's
    released models use offset 0.1 without antialiasing, its register models offset 0 with it.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    grid = math.isqrt(patch_pos.shape[1])
    if grid * grid != patch_pos.shape[1]:
        raise ValueError(f"pos_embed holds {patch_pos.shape[1]} patch positions, not a square grid")
    dim = patch_pos.shape[-1]
    height, width = target_hw
    patch_grid = patch_pos.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    if offset:
        scale = ((height + offset) / grid, (width + offset) / grid)
        resized = F.interpolate(patch_grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        resized = F.interpolate(
            patch_grid, size=(height, width), mode="bicubic", antialias=antialias
        )
    if tuple(resized.shape[-2:]) != (height, width):
        raise RuntimeError(
            f"pos_embed resampled to {tuple(resized.shape[-2:])}, wanted {target_hw}"
        )
    resized = resized.permute(0, 2, 3, 1).reshape(1, height * width, dim)  # [1, h*w, D]
    return torch.cat((cls_pos, resized.to(pos_embed.dtype)), dim=1)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        num_register_tokens: int = 0,
        attn_backend: str = "auto",
        interpolate_offset: float | None = None,
        interpolate_antialias: bool | None = None,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.n_blocks = depth
        self.ffn_layer = ffn_layer
        # DINOv2's released configurations: (0.1, no antialias), or (0, antialias) with registers.
        default_offset, default_antialias = (0.0, True) if num_register_tokens else (0.1, False)
        self.interpolate_offset = (
            default_offset if interpolate_offset is None else interpolate_offset
        )
        self.interpolate_antialias = (
            default_antialias if interpolate_antialias is None else interpolate_antialias
        )
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            if num_register_tokens
            else None
        )
        # drop_path_rate is the same for every block (DINOv2's drop_path_uniform).
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                ffn_layer,
                layerscale_init,
                drop_path_rate,
                attn_backend,
                lora_rank,
                lora_alpha,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def set_attn_backend(self, backend: str) -> None:
        """Switch every block's attention backend ("auto" | "sdpa" | "xformers")."""
        resolved = resolve_attn_backend(backend)
        for block in self.blocks:
            block.attn.attn_backend = resolved
            block.attn.resolved_backend = None

    def resolve_attention(self, device: torch.device, dtype: torch.dtype) -> str:
        """Settle every block's attention backend for `device` and compute `dtype` ("auto"
        probes xformers there once); returns the backend. Call before torch.compile."""
        return {block.attn.resolve(device, dtype) for block in self.blocks}.pop()

    def interpolate_pos_encoding(self, height: int, width: int) -> Tensor:
        """Position embeddings [1, 1 + N, D] for an image of height x width pixels."""
        target = (height // self.patch_size, width // self.patch_size)
        native = math.isqrt(self.pos_embed.shape[1] - 1)
        if target == (native, native):
            return self.pos_embed
        return interpolate_pos_embed(
            self.pos_embed, target, self.interpolate_offset, self.interpolate_antialias
        )

    def prepare_tokens_with_masks(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        batch, _, height, width = images.shape
        tokens = self.patch_embed(images)  # [B, N, D]
        if masks is not None:
            if masks.dtype != torch.bool or tuple(masks.shape) != tuple(tokens.shape[:2]):
                raise ValueError(
                    f"masks must be bool [B, N] = {tuple(tokens.shape[:2])} for images of "
                    f"{height}x{width} px, got {masks.dtype} {tuple(masks.shape)}"
                )
            tokens = torch.where(
                masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens
            )
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)  # [B, 1+N, D]
        tokens = tokens + self.interpolate_pos_encoding(height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)  # [B, 1+R+N, D]
        return tokens

    def _output(self, tokens: Tensor, masks: Tensor | None) -> dict:
        normed = self.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict | list[dict]:
        """One output dict per crop batch; a list runs every resolution through each block together."""
        if isinstance(x, Tensor):
            if masks is not None and not isinstance(masks, Tensor):
                raise ValueError("a single image batch takes a single masks tensor (or None)")
            return self.forward_features(list([x]), [masks])[0]
        mask_list = [None] * len(x) if masks is None else list(masks)
        if len(mask_list) != len(x):
            raise ValueError(f"got {len(x)} crop batches but {len(mask_list)} masks entries")
        tokens = [self.prepare_tokens_with_masks(imgs, m) for imgs, m in zip(x, mask_list)]
        for block in self.blocks:
            tokens = block(tokens)
        return [self._output(t, m) for t, m in zip(tokens, mask_list)]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        return_class_token: bool = True,
        norm: bool = True,
        reshape: bool = False,
    ) -> tuple:
        """Outputs of the last n blocks (or of the block indices in n), in block order:
        (patch tokens [B, N, D], cls [B, D]) per block, or patch tokens alone; reshape gives
        patch tokens as [B, D, h, w]."""
        wanted = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= self.n_blocks:
            raise ValueError(f"n={n} does not select blocks of a {self.n_blocks}-block model")
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in wanted:
                outputs.append(self.norm(tokens) if norm else tokens)
        first_patch = 1 + self.num_register_tokens
        patches = [out[:, first_patch:] for out in outputs]
        if reshape:
            h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patches = [p.reshape(p.shape[0], h, w, -1).permute(0, 3, 1, 2) for p in patches]
        if return_class_token:
            return tuple(zip(patches, [out[:, 0] for out in outputs]))
        return tuple(patches)

    def dinov2_state_dict(self) -> dict[str, Tensor]:
        from pretrain.models.dinov2_checkpoint import dinov2_state_dict

        return dinov2_state_dict(self)

    def load_dinov2_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        from pretrain.models.dinov2_checkpoint import load_dinov2_checkpoint

        load_dinov2_checkpoint(self, path, strict=strict)

    def save_dinov2_checkpoint(self, path: str | Path) -> None:
        from pretrain.models.dinov2_checkpoint import save_dinov2_checkpoint

        save_dinov2_checkpoint(self, path)
