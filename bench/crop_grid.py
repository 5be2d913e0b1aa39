"""Look at what the augmentation makes of real images: a grid of multi-crop views.

    python bench/crop_grid.py --out docs/img/crops_silhouettes.png      # 6 images, their crops
    python bench/crop_grid.py --config configs/pretrain/vit_test_cpu.yaml crops.local_crops_number=6

Rows: one source image (left, at 64 px) then its global crops, then its local crops, each
un-normalised and enlarged to the global crop size so they line up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from pretrain.config import load_train_config
from pretrain.data import IMAGENET_MEAN, IMAGENET_STD
from pretrain.data.loader import build_transforms
from pretrain.data.silhouettes import samples

REPO = Path(__file__).resolve().parents[1]


def to_image(t: torch.Tensor, size: int) -> Image.Image:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = ((t * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(x).resize((size, size), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/vit_test_cpu.yaml"))
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--out", type=Path, default=REPO / "bench_runs" / "crops.png")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_train_config(args.config, ["data.shards=in-memory", *args.overrides])
    augment, _ = build_transforms(cfg)
    torch.manual_seed(0)
    size = cfg.crops.global_crops_size * 2
    rows = []
    for _, _, img in samples(args.images, 5):
        views = augment(img)
        crops = views["global_crops"] + views["local_crops"]
        rows.append([img.resize((size, size), Image.NEAREST)] + [to_image(c, size) for c in crops])
    grid = Image.new("RGB", (size * len(rows[0]), size * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            grid.paste(tile, (c * size, r * size))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
