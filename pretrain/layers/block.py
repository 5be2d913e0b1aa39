"""The pre-norm transformer block with LayerScale and stochastic depth (DINOv2 names:
`norm1`, `attn`, `ls1`, `norm2`, `mlp`, `ls2`). A block takes one token batch or a list of
batches with different token counts, so that attention can pack the whole multi-crop list."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.layers.attention import Attention
from pretrain.layers.ffn import make_ffn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Drops the residual branch for whole samples with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        layerscale_init: float | None = 1e-5,
        drop_path: float = 0.0,
        attn_backend: str = "auto",
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim, num_heads, attn_backend=attn_backend, lora_rank=lora_rank, lora_alpha=lora_alpha
        )
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, Tensor):
            return self._forward_list([x])[0]
        return self._forward_list(list(x))

    def _forward_list(self, xs: list[Tensor]) -> list[Tensor]:
        attn_out = self.attn.forward_list([self.norm1(x) for x in xs])
        xs = [x + self.drop_path(self.ls1(a)) for x, a in zip(xs, attn_out)]
        return [x + self.drop_path(self.ls2(self.mlp(self.norm2(x)))) for x in xs]
