"""KoLeo regulariser (Sablayrolles et al. 2019): spreads the batch's features apart by
penalising a small distance to each one's nearest neighbour."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, cls: Tensor) -> Tensor:
        """-mean(log(distance to the nearest neighbour + eps)) of L2-normalised rows of cls [B, D]."""
        if cls.ndim != 2 or cls.shape[0] < 2:
            raise ValueError(
                f"KoLeo needs a [B, D] batch with B >= 2 (a nearest neighbour), got shape {tuple(cls.shape)}"
            )
        with torch.autocast(device_type=cls.device.type, enabled=False):
            features = F.normalize(cls.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                similarity = features @ features.t()  # [B, B]
                similarity.fill_diagonal_(-2.0)  # below any cosine: never pick oneself
                nearest = similarity.argmax(dim=1)
            # pairwise_distance adds eps inside the norm, so identical rows have a finite gradient.
            distances = F.pairwise_distance(features, features[nearest], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
