"""Linear probe on frozen features: a linear layer trained with SGD over a small lr grid; the
accuracy of the best lr on the validation set is reported (DINOv2's protocol, reduced)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _train_one(
    x: Tensor, y: Tensor, n_classes: int, lr: float, epochs: int, batch_size: int, seed: int
) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps = epochs * max(1, (len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    lrs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0),
    epochs: int = 30,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    # Standardise with train statistics: one lr grid then fits any feature scale.
    mean, std = train_features.mean(0), train_features.std(0).clamp(min=1e-6)
    x_train, x_val = (train_features - mean) / std, (val_features - mean) / std
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    results = {}
    for lr in lrs:
        head = _train_one(x_train, train_labels, n_classes, lr, epochs, batch_size, seed)
        with torch.no_grad():
            results[lr] = float((head(x_val).argmax(-1) == val_labels).float().mean())
    best = max(results, key=results.get)
    return {
        "accuracy": results[best],
        "best_lr": best,
        **{f"acc_lr_{lr:g}": a for lr, a in results.items()},
    }
