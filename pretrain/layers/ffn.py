"""Feed-forward layers of the transformer block, with DINOv2's parameter names.

`Mlp` stores `fc1`/`fc2`; `SwiGLUFFN` stores one fused input projection `w12` and the output `w3`,
the layout of DINOv2's `SwiGLUFFNFused` (used by its ViT-g/14 release).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(mlp_hidden_features: int) -> int:
    """The SwiGLU width matching an MLP's parameter count (2/3 of it), rounded up to a multiple of 8."""
    return (int(mlp_hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden)
        self.w3 = nn.Linear(hidden, in_features)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}


def make_ffn(kind: str, in_features: int, hidden_features: int) -> nn.Module:
    if kind not in FFN_LAYERS:
        raise ValueError(f"ffn_layer must be one of {sorted(FFN_LAYERS)}, got {kind!r}")
    return FFN_LAYERS[kind](in_features, hidden_features)
