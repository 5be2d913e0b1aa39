"""What a short DINOv2 run learns on generated data, measured as it trains.

One process, no torchrun: the training pieces of `pretrain` (SSLModel, the three losses, AdamW
groups, schedules, EMA) on in-memory shapes, with the teacher's k-NN accuracy (label = shape)
every `--eval-every` steps. Used for the ablations in docs/training.md ("The shapes check").

    python bench/learns_shapes.py --steps 600 --lr 0.004                       # the test's recipe
    python bench/learns_shapes.py --steps 600 --background colour             # the shortcut
    python bench/learns_shapes.py --steps 600 loss.ibot_weight=0 loss.koleo_weight=0   # DINO alone
    python bench/learns_shapes.py --data silhouettes --images 8000 --steps 1200    # the hard set

``--data silhouettes`` (pretrain.data.silhouettes): 10 outline classes on crops of real
photographs, colour/size/position/rotation random. Each run also prints the raw-pixel k-NN
floor (the eval images themselves, flattened, as features).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pretrain import arch, optim
from pretrain.config import TrainConfig, load_train_config
from pretrain.data import silhouettes, synthetic
from pretrain.data.loader import build_transforms
from pretrain.eval.features import extract_features
from pretrain.eval.knn import knn_accuracy

REPO = Path(__file__).resolve().parents[1]


class ShapeBatches(IterableDataset):
    """Endless multi-crop batches drawn with replacement from a fixed pool of images."""

    def __init__(self, cfg: TrainConfig, pool: list, batch_size: int) -> None:
        self.cfg, self.pool, self.batch_size = cfg, pool, batch_size

    def __iter__(self):
        augment, collate = build_transforms(self.cfg)
        rng = random.Random(self.cfg.train.seed)
        torch.manual_seed(self.cfg.train.seed + 1)
        while True:
            picks = [self.pool[rng.randrange(len(self.pool))] for _ in range(self.batch_size)]
            yield collate([augment(img) for img in picks])


def raw_pixel_top1(train, val, size: int) -> float:
    """k-NN@20 on the pixels themselves, at the eval size: the floor a backbone must clear."""

    def pixels(items):
        return torch.stack([torch.from_numpy(np.asarray(img.resize((size, size)), np.float32))
                            .flatten() for _, _, img in items])  # fmt: skip

    x_train, x_val = pixels(train), pixels(val)
    x_train, x_val = x_train - x_train.mean(0), x_val - x_train.mean(0)
    y_train = torch.tensor([label for _, label, _ in train])
    y_val = torch.tensor([label for _, label, _ in val])
    return knn_accuracy(x_train, y_train, x_val, y_val, ks=(20,))[20]


def knn_top1(backbone, train, val, size: int) -> float:
    backbone.eval()
    x_train = extract_features(backbone, [img for _, _, img in train], size)
    x_val = extract_features(backbone, [img for _, _, img in val], size)
    y_train = torch.tensor([label for _, label, _ in train])
    y_val = torch.tensor([label for _, label, _ in val])
    return knn_accuracy(x_train, y_train, x_val, y_val, ks=(20,))[20]


def add_silhouette_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, default=len(silhouettes.CLASSES),
                        help="silhouettes: use the first N classes")  # fmt: skip
    parser.add_argument("--radius", default="0.17,0.33",
                        help="silhouettes: radius range, fraction of the side")  # fmt: skip
    parser.add_argument("--max-angle", type=float, default=25.0, help="silhouettes: rotation")


def silhouette_variant(args: argparse.Namespace) -> silhouettes.Variant:
    low, high = (float(v) for v in args.radius.split(","))
    return silhouettes.Variant(args.classes, (low, high), args.max_angle)


def make_sets(data: str, images: int, eval_images: int, background: str = "grey",
              variant: silhouettes.Variant | None = None):  # fmt: skip
    """(training pool [(label, image)], k-NN train, k-NN val, nuisance sets or None): seeds 1, 2
    and 3. For silhouettes the nuisance sets carry the background photograph as the label."""
    variant = variant or silhouettes.Variant()
    if data == "shapes":

        def make(n, seed):
            return list(synthetic.samples(n, seed, background=background))
    else:

        def make(n, seed):
            return list(silhouettes.samples(n, seed, variant=variant))

    nuisance = None
    if data == "silhouettes":

        def by_background(n, seed):
            rows = silhouettes.samples_with_background(n, seed, variant=variant)
            return [(key, photo, img) for key, _, photo, img in rows]

        nuisance = (by_background(eval_images, 2), by_background(eval_images, 3))
    pool = [(label, img) for _, label, img in make(images, 1)]
    return pool, make(eval_images, 2), make(eval_images, 3), nuisance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--lr", type=float, default=0.0005, help="the YAML has 0.004")
    parser.add_argument("--images", type=int, default=2048, help="training pool")
    parser.add_argument("--eval-images", type=int, default=1000, help="per k-NN split")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--background", choices=["grey", "colour"], default="grey")
    parser.add_argument("--data", choices=["shapes", "silhouettes"], default="shapes")
    parser.add_argument("--config", default=str(REPO / "configs/pretrain/vit_test_cpu.yaml"))
    add_silhouette_args(parser)
    parser.add_argument("overrides", nargs="*", help="key=value on the training config")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_train_config(
        args.config,
        ["data.shards=in-memory", f"train.steps={args.steps}", f"optim.base_lr={args.lr}",
         f"data.batch_size_per_rank={args.batch}", *args.overrides],
    )  # fmt: skip
    pool, train, val, nuisance = make_sets(args.data, args.images, args.eval_images,
                                           args.background, silhouette_variant(args))  # fmt: skip
    pool = [img for _, img in pool]
    batches = iter(DataLoader(ShapeBatches(cfg, pool, args.batch), batch_size=None, num_workers=1))

    torch.manual_seed(cfg.train.seed)
    student, teacher = arch.build_student_teacher(cfg)
    losses = arch.build_losses(cfg)
    optimizer = optim.build_optimizer(student, cfg.optim, student.backbone.n_blocks)
    schedules = optim.Schedules(cfg.optim, cfg.train, args.batch)
    params = [p for p in student.parameters() if p.requires_grad]
    size = cfg.crops.global_crops_size
    print(
        f"overrides: {' '.join(args.overrides) or '-'}; data {args.data}, background "
        f"{args.background}; raw-pixel k-NN@20 {raw_pixel_top1(train, val, size):.3f}"
    )

    def report() -> str:
        text = f"teacher k-NN@20 {knn_top1(teacher.backbone, train, val, size):.3f}"
        if nuisance:
            text += f" (by background photo: {knn_top1(teacher.backbone, *nuisance, size):.3f})"
        return text

    if nuisance:
        print(f"raw-pixel k-NN@20 by background photo {raw_pixel_top1(*nuisance, size):.3f}")
    print(f"step     0  {report()}")
    start = time.perf_counter()
    for step in range(args.steps):
        values = schedules.at(step)
        optim.apply_step_values(optimizer, values)
        student.train()
        terms = arch.compute_losses(
            student, teacher, losses, next(batches), values.teacher_temp, cfg
        )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        optimizer.step()
        arch.update_teacher(student, teacher, values.momentum)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(
                f"step {step + 1:5d}  {report()}  dino {terms.dino.item():.3f} "
                f"ibot {terms.ibot.item():.3f} koleo {terms.koleo.item():.3f}  "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
