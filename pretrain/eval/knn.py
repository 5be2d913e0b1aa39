"""Weighted k-NN classification on L2-normalised CLS features (DINO's protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    ks: tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy for each k (capped at the train size): votes weighted by exp(cos / T)."""
    train = F.normalize(train_features.float(), dim=-1)
    val = F.normalize(val_features.float(), dim=-1)
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    k_max = min(max(ks), len(train))
    correct = dict.fromkeys(ks, 0)
    for start in range(0, len(val), chunk):
        sims = val[start : start + chunk] @ train.T  # [V, N]
        top_sims, top_idx = sims.topk(k_max, dim=-1)  # [V, k_max]
        top_labels = train_labels[top_idx]  # [V, k_max]
        weights = (top_sims / temperature).exp()
        truth = val_labels[start : start + chunk]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(truth), n_classes)
            votes.scatter_add_(1, top_labels[:, :kk], weights[:, :kk])  # [V, C]
            correct[k] += int((votes.argmax(dim=-1) == truth).sum())
    return {k: correct[k] / len(val) for k in ks}
