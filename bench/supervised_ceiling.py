"""The ceiling of a learning check: the same backbone, budget and crops, trained *with* labels.

Trains the training config's backbone plus a linear classifier on its CLS token with cross
entropy, one global crop of each image a step (the recipe's crop, flip, colour and blur), then
reports the same k-NN@20 as `bench/learns_shapes.py`. It tells whether a self-supervised
figure is low because the objective misses the signal or because the model and the budget
cannot carry it at all. `--backbone cnn` swaps in a small conv net (4 conv-BN-ReLU-pool
blocks, about 0.1M parameters against vit_test's 0.2M) to show whether the signal is
learnable in the budget by a model with a convolution's prior.

    python bench/supervised_ceiling.py --data silhouettes --steps 2000 --lr 3e-4
    python bench/supervised_ceiling.py --data silhouettes --steps 800 --backbone cnn --lr 1e-3 \\
        crops.blur_probs=[0,0,0] crops.color_jitter_prob=0 crops.grayscale_prob=0 \\
        crops.solarize_prob=0
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learns_shapes import (  # noqa: E402
    REPO,
    add_silhouette_args,
    knn_top1,
    make_sets,
    silhouette_variant,
)

from pretrain import arch  # noqa: E402
from pretrain.config import load_train_config  # noqa: E402
from pretrain.data.loader import build_transforms  # noqa: E402


class SmallCNN(nn.Module):
    """[B, 3, H, W] -> [B, 64]: four 3x3 conv-BN-ReLU-maxpool blocks, global average pool."""

    embed_dim = 64

    def __init__(self) -> None:
        super().__init__()
        layers, width = [], 3
        for out in (32, 64, 64, 64):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.MaxPool2d(2)]  # fmt: skip
            width = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--data", choices=["shapes", "silhouettes"], default="silhouettes")
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/vit_tiny_cpu.yaml"))
    parser.add_argument("--backbone", choices=["vit", "cnn"], default="vit",
                        help="vit: the config's backbone")  # fmt: skip
    add_silhouette_args(parser)
    parser.add_argument("overrides", nargs="*", help="key=value on the training config")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_train_config(args.config, ["data.shards=in-memory", *args.overrides])
    pool, train, val, _ = make_sets(args.data, args.images, args.eval_images,
                                    variant=silhouette_variant(args))  # fmt: skip
    labelled = pool  # [(label, image)]
    augment, _ = build_transforms(cfg)
    torch.manual_seed(cfg.train.seed)
    if args.backbone == "cnn":
        backbone = SmallCNN()
    else:
        backbone = arch.SSLModel(cfg, cfg.model.drop_path_rate).backbone
    n_classes = 1 + max(label for label, _ in labelled)
    classifier = nn.Linear(backbone.embed_dim, n_classes)
    params = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.04)
    size = cfg.crops.global_crops_size
    rng = random.Random(cfg.train.seed)
    print(f"step     0  k-NN@20 {knn_top1(backbone, train, val, size):.3f}", flush=True)
    start = time.perf_counter()
    for step in range(args.steps):
        picks = [labelled[rng.randrange(len(labelled))] for _ in range(args.batch)]
        x = torch.stack([augment(img)["global_crops"][0] for _, img in picks])
        y = torch.tensor([label for label, _ in picks])
        backbone.train()
        loss = nn.functional.cross_entropy(classifier(backbone(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(
                f"step {step + 1:5d}  k-NN@20 {knn_top1(backbone, train, val, size):.3f}  "
                f"loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
