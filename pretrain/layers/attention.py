"""Multi-head self-attention over one crop batch or a list of crop batches of different sizes.

Two backends give the same numbers:
- "sdpa": PyTorch scaled_dot_product_attention, one call per crop resolution (the reference; CPU).
- "xformers": every crop of the list packed into one sequence and attended in a single
  `memory_efficient_attention` call with a block-diagonal mask (CUDA only), as DINOv2 trains.

"auto" takes xformers only where it has run: the first CUDA forward in each (device, dtype)
probes xformers once with a tiny packed attention checked against SDPA, and any failure (no
CUDA kernels in the wheel, a wheel built for another torch, an unsupported GPU) makes "auto" use
SDPA with one log line naming the reason. Forcing "xformers" where the probe fails is an error
naming that reason. The environment variable DINOFORGE_ATTN, when set, overrides the backend
chosen in code.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
from torch import Tensor, nn
from torch.nn import functional as F

ATTN_BACKENDS = ("auto", "sdpa", "xformers")
ATTN_ENV_VAR = "DINOFORGE_ATTN"

log = logging.getLogger(__name__)
# Device types xformers has kernels for (the tests widen it to run the packed path on a CPU
# through a stand-in for xformers).
PACKED_DEVICE_TYPES = ("cuda",)


@functools.cache
def _import_xformers() -> tuple[object | None, str | None]:
    """(xformers.ops, None), or (None, why it does not import)."""
    try:
        from xformers import ops
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return None, f"xformers does not import ({type(exc).__name__}: {exc})"
    return ops, None


def xformers_ops():
    """The xformers.ops module, or None when xformers is not installed or does not import."""
    return _import_xformers()[0]


def _one_line(exc: BaseException) -> str:
    """An exception as one log line: its first line and, for xformers' long "no operator
    found" reports, its last (the reason the last operator refused), at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = " ... ".join(dict.fromkeys(lines[:1] + lines[-1:]))
    return f"{type(exc).__name__}: {text}"[:300]


def probe_packed_attention(ops, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run one tiny packed attention with `ops` on `device` in `dtype` and compare it with SDPA
    per block; None when it ran and agreed, else the reason it cannot be used."""
    generator = torch.Generator().manual_seed(0)
    seqlens = [5, 3]  # two crops of different lengths: the block-diagonal case training uses
    q, k, v = (
        torch.randn(1, sum(seqlens), 2, 16, generator=generator).to(device=device, dtype=dtype)
        for _ in range(3)
    )  # [1, T, H, Dh]
    # The probe may run inside a training forward: no autocast, no graph.
    with torch.autocast(device.type, enabled=False), torch.no_grad():
        try:
            bias = ops.fmha.BlockDiagonalMask.from_seqlens(seqlens)
            out = ops.memory_efficient_attention(q, k, v, attn_bias=bias).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - whatever the kernel raises, it cannot be used
            return _one_line(exc)
        reference, start = [], 0
        for n in seqlens:
            block = [t[:, start : start + n].transpose(1, 2).float() for t in (q, k, v)]
            reference.append(F.scaled_dot_product_attention(*block).transpose(1, 2))
            start += n
    error = (out - torch.cat(reference, dim=1)).abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if not error <= tolerance:  # also catches NaN
        return f"its output differs from SDPA by {error:.3g} (tolerance {tolerance:g})"
    return None


@functools.cache
def xformers_unusable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why xformers' packed attention cannot run on (device, dtype), or None; probed once."""
    if device.type not in PACKED_DEVICE_TYPES:
        return f"xformers has no {device.type} kernels"
    ops, reason = _import_xformers()
    if ops is None:
        return reason
    return probe_packed_attention(ops, device, dtype)


@functools.cache
def _auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """What "auto" runs on (device, dtype): one log line when xformers is set aside."""
    if device.type not in PACKED_DEVICE_TYPES:
        return "sdpa"
    reason = xformers_unusable_reason(device, dtype)
    if reason is None:
        log.info("attention: xformers packed attention on %s (%s)", device, dtype)
        return "xformers"
    log.warning("attention: using SDPA on %s (%s): xformers cannot run: %s", device, dtype, reason)
    return "sdpa"


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype q, k and v will have: autocast's, when it is on for x's device."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


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
            f"attention backend 'xformers' was requested but {_import_xformers()[1]}; "
            "install the `gpu` extra (an xformers built for this torch) or use "
            "attn_backend='sdpa' or 'auto'"
        )
    return backend


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_backend: str = "auto",
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # LoRA: qkv(x) + scale * B A x (and the same on proj). B starts at zero, so a loaded
        # backbone computes exactly what it did; `merged_weight` folds it in for export.
        self.lora_rank = lora_rank
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        if lora_rank:
            for name, out_features in (("qkv", dim * 3), ("proj", dim)):
                down = nn.Parameter(torch.empty(lora_rank, dim))
                nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as nn.Linear's own weights
                setattr(self, f"{name}_lora_a", down)
                setattr(self, f"{name}_lora_b", nn.Parameter(torch.zeros(out_features, lora_rank)))
        self.attn_backend = resolve_attn_backend(attn_backend)
        # The backend settled for a known device and dtype (see `resolve`), so that a compiled
        # forward never reaches the probe; None: decided at the first forward.
        self.resolved_backend: str | None = None

    def resolve(self, device: torch.device, dtype: torch.dtype) -> str:
        """Settle the backend for inputs on `device` computed in `dtype` (probing once)."""
        probe = torch.empty(0, device=device, dtype=dtype)
        with torch.autocast(device.type, enabled=False):
            self.resolved_backend = None
            self.resolved_backend = self._backend_for(probe)
        return self.resolved_backend

    def _backend_for(self, x: Tensor) -> str:
        if self.resolved_backend is not None:
            return self.resolved_backend
        if self.attn_backend == "sdpa":
            return "sdpa"
        dtype = _compute_dtype(x)
        if self.attn_backend == "xformers":
            if x.device.type not in PACKED_DEVICE_TYPES:
                raise RuntimeError(
                    f"attention backend 'xformers' needs CUDA tensors, got a {x.device.type} tensor; "
                    "use attn_backend='sdpa' (or 'auto') off the GPU"
                )
            reason = xformers_unusable_reason(x.device, dtype)
            if reason is not None:
                raise RuntimeError(
                    f"attention backend 'xformers' cannot run on {x.device} ({dtype}): {reason}; "
                    "use attn_backend='auto' (falls back to SDPA) or 'sdpa'"
                )
            return "xformers"
        return _auto_backend(x.device, dtype)

    def _linear(self, name: str, x: Tensor) -> Tensor:
        out = getattr(self, name)(x)
        if self.lora_rank:
            down, up = getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b")
            out = out + F.linear(F.linear(x, down), up) * self.lora_scale
        return out

    def merged_weight(self, name: str, weight: Tensor, down: Tensor, up: Tensor) -> Tensor:
        """`name`'s weight with its LoRA update folded in (whole tensors, as in a state dict)."""
        merged = weight.float() + self.lora_scale * (up.float() @ down.float())
        return merged.to(weight.dtype)

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
        qkv = self._linear("qkv", x).reshape(
            batch, tokens, 3, self.num_heads, dim // self.num_heads
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, Dh]
        return self._linear("proj", out.transpose(1, 2).reshape(batch, tokens, dim))

    def _packed_xformers(self, xs: list[Tensor]) -> list[Tensor]:
        ops = xformers_ops()
        dim = xs[0].shape[-1]
        bias = _block_diagonal_mask(tuple((x.shape[0], x.shape[1]) for x in xs), xs[0].device)
        packed = torch.cat([x.reshape(1, -1, dim) for x in xs], dim=1)  # [1, sum B_i*N_i, D]
        qkv = self._linear("qkv", packed)
        qkv = qkv.reshape(1, packed.shape[1], 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.unbind(2)  # each [1, T, H, Dh]
        out = ops.memory_efficient_attention(q, k, v, attn_bias=bias)  # [1, T, H, Dh]
        out = self._linear("proj", out.reshape(1, packed.shape[1], dim))
        pieces = out.split([x.shape[0] * x.shape[1] for x in xs], dim=1)
        return [p.reshape(x.shape) for p, x in zip(pieces, xs)]
