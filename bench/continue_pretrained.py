"""Continued pretraining from "released" weights, and distillation, measured with k-NN.

The stand-in for a released backbone: vit_tiny_cpu.yaml trained here on data set A (crops of
six grey scikit-image photographs: brick, grass, gravel, camera, moon, coins; the class is the
photograph) and exported in the official DINOv2 layout. It is then continued on data set B
(generated shapes on grey backgrounds, 4 classes: a domain the start model has not seen) in
the ways below, and the k-NN accuracy is measured on both sets: A tells what the backbone kept
(retention), B what it gained (adaptation).

- (c) the start backbone unchanged;
- (a) naive: the stock recipe on B with `model.pretrained=` the export (new heads, the recipe's
  lr from the first step): what users report collapses;
- (b) the continued-pretraining recipe, configs/pretrain/continue_tiny_cpu.yaml (heads first
  with the backbone frozen, then a lower backbone lr with its own warm-up);
- distillation: a thinner student (embed 32, depth 2) trained on B with the (b) run as its
  frozen teacher (DINOv2-style, the run's heads give the targets), against the same student
  from scratch, the same steps.

    python bench/continue_pretrained.py                 # about 15 minutes on 2 CPU cores
    python bench/continue_pretrained.py --start-steps 300 --steps 150   # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rows import RowWriter, add_jsonl_arg
from bench_loader import photo_samples

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = str(REPO / "configs/pretrain/vit_tiny_cpu.yaml")
CONTINUE = str(REPO / "configs/pretrain/continue_tiny_cpu.yaml")
TEXTURES = ("brick", "grass", "gravel", "camera", "moon", "coins")  # grey photographs
THIN = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


def write_sets(root: Path, images: int, eval_images: int) -> dict[str, Path]:
    from pretrain.data.synthetic import SHAPES, samples, write_folders, write_shards

    out = {"A": root / "A", "B": root / "B"}
    write_shards(out["A"], photo_samples(images, 64, 1, TEXTURES), TEXTURES, per_shard=500)
    write_folders(root / "A_train", photo_samples(eval_images, 64, 2, TEXTURES), TEXTURES)
    write_folders(root / "A_val", photo_samples(eval_images, 64, 3, TEXTURES), TEXTURES)
    write_shards(out["B"], samples(images, 1), SHAPES, per_shard=500)
    write_folders(root / "B_train", samples(eval_images, 2), SHAPES)
    write_folders(root / "B_val", samples(eval_images, 3), SHAPES)
    return out


def train(config: str, out: Path, overrides: list[str]) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pretrain.train", "--config", config, f"output_dir={out}",
           "logging.tensorboard=false", "train.log_every=25", *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{out.name} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def knn(checkpoint: Path, root: Path, data: str) -> float:
    out = checkpoint.parent / f"knn_{checkpoint.name}_{data}.json"
    cmd = [sys.executable, "-m", "pretrain.eval", "knn", "--checkpoint", str(checkpoint),
           "--train", str(root / f"{data}_train"), "--val", str(root / f"{data}_val"),
           "--ks", "20", "--output", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"k-NN of {checkpoint} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())["knn_top1_k20"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000, help="images in each training set")
    p.add_argument("--eval-images", type=int, default=240, help="k-NN train and val, each set")
    p.add_argument("--start-steps", type=int, default=600, help="the 'released' model on A")
    p.add_argument("--steps", type=int, default=300, help="each continuation on B")
    p.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    add_jsonl_arg(p, "continue_pretrained")
    args = p.parse_args()
    rows = RowWriter.from_args(args, "continue_pretrained")
    root = Path(args.keep or tempfile.mkdtemp(prefix="continue-"))
    root.mkdir(parents=True, exist_ok=True)
    sets = write_sets(root, args.images, args.eval_images)
    data = {name: [f"data.shards={path}"] for name, path in sets.items()}
    start = root / "start"
    seconds = train(TINY, start, [*data["A"], f"train.steps={args.start_steps}"])
    released = start / "teacher_backbone.safetensors"  # the official layout: our stand-in
    steps = [f"train.steps={args.steps}"]
    runs = {
        "c_unchanged": (released, None),
        "a_naive": (root / "a_naive", (TINY, [*data["B"], *steps, f"model.pretrained={released}"])),
        "b_recipe": (root / "b_recipe", (CONTINUE, [*data["B"], *steps,
                                                    f"model.pretrained={released}"])),
        "scratch_student": (root / "scratch", (TINY, [*data["B"], *steps, *THIN])),
        "distilled_student": (root / "distilled", (TINY, [*data["B"], *steps, *THIN,
                                                         f"distill.teacher={root / 'b_recipe'}"])),
    }  # fmt: skip
    results = {}
    for name, (checkpoint, job) in runs.items():
        row = {"run": name, "start_steps": args.start_steps, "steps": args.steps,
               "start_train_s": round(seconds, 1)}  # fmt: skip
        if job is not None:
            row["train_s"] = round(train(job[0], checkpoint, job[1]), 1)
        row["knn_A"], row["knn_B"] = knn(checkpoint, root, "A"), knn(checkpoint, root, "B")
        results[name] = rows.write(row)
        print(json.dumps(row), flush=True)
    c = results["c_unchanged"]
    print(f"\nk-NN@20 (chance {1 / len(TEXTURES):.3f} on A, {1 / 4:.3f} on B); runs in {root}")
    print("| run | A (retention) | vs unchanged | B (adaptation) | vs unchanged |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['knn_A']:.3f} | {100 * (r['knn_A'] - c['knn_A']):+.1f} pt | "
              f"{r['knn_B']:.3f} | {100 * (r['knn_B'] - c['knn_B']):+.1f} pt |")  # fmt: skip


if __name__ == "__main__":
    main()
