"""Multi-head self-attention over one crop batch or a list of crop batches of different sizes.

Two backends give the same numbers:
- "sdpa": PyTorch scaled_dot_product_attention, one call per crop resolution (the reference; CPU).
- "xformers": every crop of the list packed into one sequence and attended in a single
  `memory_efficient_attention` call with a block-diagonal mask (CUDA only), as DINOv2 trains.
"auto" takes xformers for CUDA tensors when it imports, SDPA otherwise. The environment variable
DINOFORGE_ATTN, when set, overrides the backend chosen in code.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ATTN_BACKENDS = ("auto", "sdpa", "xformers")
ATTN_ENV_VAR = "DINOFORGE_ATTN"


@functools.cache
def xformers_ops():
    """The xformers.ops module, or None when xformers is not installed or does not import."""
    try:
        from xformers import ops
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return ops


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(batch_shapes: tuple[tuple[int, int], ...], device: torch.device):
    """One attention block per crop: batch_shapes holds (crops, tokens) per resolution. Cached,
    as every block of a step (and most steps) sees the same shapes."""
    fmha = xformers_ops().fmha
    seqlens = [tokens for crops, tokens in batch_shapes for _ in range(crops)]
    try:
        return fmha.BlockDiagonalMask.from_seqlens(seqlens, device=device)
    except TypeError:  # older xformers: no device argument
        return fmha.BlockDiagonalMask.from_seqlens(seqlens)


def resolve_attn_backend(requested: str) -> str:
    """Apply the DINOFORGE_ATTN override and check the name; returns one of ATTN_BACKENDS."""
    backend = os.environ.get(ATTN_ENV_VAR) or requested
    if backend not in ATTN_BACKENDS:
        source = (
            f"environment variable {ATTN_ENV_VAR}"
            if os.environ.get(ATTN_ENV_VAR)
            else "attn_backend"
        )
        raise ValueError(f"{source} must be one of {ATTN_BACKENDS}, got {backend!r}")
    if backend == "xformers" and xformers_ops() is None:
        raise RuntimeError(
            "attention backend 'xformers' was requested but xformers does not import; "
            "install the `gpu` extra or use attn_backend='sdpa'"
        )
    return backend


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.attn_backend = resolve_attn_backend(attn_backend)

    def _backend_for(self, x: Tensor) -> str:
        if self.attn_backend == "sdpa":
            return "sdpa"
        if self.attn_backend == "xformers":
            if not x.is_cuda:
                raise RuntimeError(
                    f"attention backend 'xformers' needs CUDA tensors, got a {x.device.type} tensor; "
                    "use attn_backend='sdpa' (or 'auto') off the GPU"
                )
            return "xformers"
        return "xformers" if x.is_cuda and xformers_ops() is not None else "sdpa"

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, Tensor):
            return self.forward_list([x])[0]
        return self.forward_list(x)

    def forward_list(self, xs: list[Tensor]) -> list[Tensor]:
        if self._backend_for(xs[0]) == "xformers":
            return self._packed_xformers(xs)
        return [self._sdpa(x) for x in xs]

    def _sdpa(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def _packed_xformers(self, xs: list[Tensor]) -> list[Tensor]:
        ops = xformers_ops()
        dim = xs[0].shape[-1]
        bias = _block_diagonal_mask(tuple((x.shape[0], x.shape[1]) for x in xs), xs[0].device)
        packed = torch.cat([x.reshape(1, -1, dim) for x in xs], dim=1)  # [1, sum B_i*N_i, D]
        qkv = self.qkv(packed).reshape(1, packed.shape[1], 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.unbind(2)  # each [1, T, H, Dh]
        out = ops.memory_efficient_attention(q, k, v, attn_bias=bias)  # [1, T, H, Dh]
        out = self.proj(out.reshape(1, packed.shape[1], dim))
        pieces = out.split([x.shape[0] * x.shape[1] for x in xs], dim=1)
        return [p.reshape(x.shape) for p, x in zip(pieces, xs)]
