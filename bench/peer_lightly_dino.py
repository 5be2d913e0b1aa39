"""The peer for the learning check: lightly's DINO on a timm ViT of vit_test's size, same data.

    python bench/peer_lightly_dino.py --steps 1200              # creates bench_runs/venv-lightly

Runs in its own venv (bench_runs/venv-lightly, made here if missing): lightly installed there,
torch/torchvision/timm shared with dinoforge's .venv through a .pth file, so the peer runs on the
same pinned torch. lightly's pieces at its own recommended settings (its DINO example and
defaults): `DINOProjectionHead(64, 512, 64, 2048)`, `DINOLoss(2048)` with its teacher
temperature warm-up, `DINOTransform` (2 global + 6 local crops, its colour jitter, blur and
solarisation; crop sizes scaled to 64 px images: 56 and 28), EMA momentum 0.99, Adam at 1e-3.
The backbone is timm's VisionTransformer with vit_test's shape (dim 64, depth 4, 4 heads, patch
14, CLS token). Data: the same silhouettes pool as `bench/learns_shapes.py --data silhouettes`;
evaluation: dinoforge's own k-NN code (k=20) on the same 1,000 / 1,000 labelled images.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "bench_runs" / "venv-lightly"
PIP_ENV = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {
    "PIP_CONFIG_FILE": "/dev/null"
}


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
        ours = sysconfig.get_paths()["purelib"]  # dinoforge's .venv: torch, torchvision, timm
        (Path(site) / "dinoforge-venv.pth").write_text(ours + "\n")
        pip = [str(python), "-m", "pip", "install", "-q", "--no-deps"]
        subprocess.run([*pip, "lightly", "lightly-utils", "aenum", "hydra-core",
                        "antlr4-python3-runtime==4.9.3", "lightning-utilities"], check=True, env=PIP_ENV)  # fmt: skip
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    if Path(sys.prefix).resolve() != VENV.resolve():
        python = ensure_venv()
        os.execv(str(python), [str(python), __file__, *sys.argv[1:]])
    train(args)


def train(args) -> None:
    sys.path.insert(0, str(REPO))
    import timm
    import torch
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.dino_transform import DINOTransform

    from pretrain.data.silhouettes import samples
    from pretrain.eval.features import extract_features
    from pretrain.eval.knn import knn_accuracy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    pool = [img for _, _, img in samples(args.images, 1)]
    train_set, val_set = list(samples(args.eval_images, 2)), list(samples(args.eval_images, 3))
    transform = DINOTransform(global_crop_size=56, local_crop_size=28)

    def vit():
        return timm.models.vision_transformer.VisionTransformer(
            img_size=56, patch_size=14, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4,
            num_classes=0, dynamic_img_size=True)  # fmt: skip

    def model():
        return torch.nn.ModuleDict(
            {"backbone": vit(), "head": DINOProjectionHead(64, 512, 64, 2048)}
        )

    # A copy built and loaded, not deep-copied: lightly's head uses the old weight_norm hook,
    # which deepcopy refuses.
    student, teacher = model(), model()
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=5)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    steps_per_epoch = max(1, args.images // args.batch)

    def knn() -> float:
        backbone = teacher["backbone"].eval()
        with torch.no_grad():
            xs = [
                extract_features(backbone, [im for _, _, im in s], 56) for s in (train_set, val_set)
            ]
        ys = [torch.tensor([label for _, label, _ in s]) for s in (train_set, val_set)]
        return knn_accuracy(xs[0], ys[0], xs[1], ys[1], ks=(20,))[20]

    print(f"lightly DINO peer: step 0 teacher k-NN@20 {knn():.3f}", flush=True)
    start = time.perf_counter()
    for step in range(args.steps):
        views = [transform(pool[rng.randrange(len(pool))]) for _ in range(args.batch)]
        crops = [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]
        student.train()
        teacher_out = [teacher["head"](teacher["backbone"](c)) for c in crops[:2]]
        student_out = [student["head"](student["backbone"](c)) for c in crops]
        loss = criterion(teacher_out, student_out, epoch=step // steps_per_epoch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_momentum(student, teacher, m=0.99)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"step {step + 1:5d}  teacher k-NN@20 {knn():.3f}  dino {loss.item():.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
