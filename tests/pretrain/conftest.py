"""Fixtures for the pretraining core tests (model, losses, data)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """A real photograph (512x512 RGB) shipped with scikit-image."""
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


class _ReferenceBlockDiagonalMask:
    def __init__(self, seqlens):
        self.seqlens = list(seqlens)

    @classmethod
    def from_seqlens(cls, seqlens, device=None):
        return cls(seqlens)


class _ReferenceXformersOps:
    """A dense stand-in for xformers (which has no CPU kernels): block-diagonal attention as an
    explicit boolean mask, to check the packing and unpacking around the real kernel."""

    class fmha:  # noqa: N801 - mirrors the xformers.ops.fmha namespace
        BlockDiagonalMask = _ReferenceBlockDiagonalMask

    @staticmethod
    def memory_efficient_attention(q, k, v, attn_bias):
        segment = torch.repeat_interleave(
            torch.arange(len(attn_bias.seqlens)), torch.tensor(attn_bias.seqlens)
        )
        allowed = segment[:, None] == segment[None, :]  # [T, T]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [1, H, T, Dh]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed
        ).transpose(1, 2)


@pytest.fixture
def reference_xformers():
    """The dense stand-in for `xformers.ops` (memory_efficient_attention + BlockDiagonalMask)."""
    return _ReferenceXformersOps
