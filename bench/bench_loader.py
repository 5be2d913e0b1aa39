"""Loader images/s per CPU core: the training data stream as it was (every augmentation step and
the normalisation in the loader, float32 out) against what the loader does now (uint8 out,
normalised on the device) and with `crops.photometric=device` (the loader only decodes, crops,
flips and draws the parameters; the rest runs batched on the training device).

Each mode runs the real stream (`ShardStream`: tar reads, shuffle buffer, JPEG decode, the
multi-crop augmentation, iBOT masks, collate) in this process on one thread, so images/s is
per loader core, which is what a DataLoader worker gets. What is left for the device (the copy,
the batched photometric part, the normalisation) is timed separately on `--device` (on a CPU
it is a bound far above what a GPU takes); modes alternate round by round on the same shards.

    python bench/bench_loader.py                      # both geometries, 3 rounds
    python bench/bench_loader.py --geometry 224 --rounds 5 --batches 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _rows import RowWriter, add_jsonl_arg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, images in the shards, global crop, local crop, local crops, patch): the DINOv2 crop
# setting on photographs the size the crawl writes (256 px short side), and the small setting
# the H200 loader measurement used (64 px images, 2 x 64 + 6 x 32 crops, patch 8).
GEOMETRIES = {
    "224": dict(source="photos", size=256, global_size=224, local_size=98, n_local=8, patch=14),
    "64": dict(source="shapes", size=64, global_size=64, local_size=32, n_local=6, patch=8),
}
MODES = ("before", "uint8", "device")  # loader output: normalized, uint8, geometric


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def photo_samples(n: int, size: int, seed: int = 0, names: tuple[str, ...] = PHOTOS):
    """(key, photo index, image): random square crops of the photographs shipped with
    scikit-image (half their short side to all of it), resized to `size` px."""
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    rng = random.Random(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = rng.randint(min(photo.size) // 2, min(photo.size))
        x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
        yield f"{seed:04d}{i:08d}", i % len(photos), crop


def write_data(out: Path, geometry: dict, n: int) -> str:
    from pretrain.data.synthetic import SHAPES, write_shapes_shards, write_shards

    if geometry["source"] == "shapes":
        write_shapes_shards(out, n, per_shard=128, size=geometry["size"])
    else:
        write_shards(out, photo_samples(n, geometry["size"]), SHAPES * 2, per_shard=128)
    return str(out / "*.tar")


def stream(cfg, output: str, shards: list[str]):
    from pretrain.data.loader import ShardStream, build_transforms

    augment, collate = build_transforms(cfg, output=output)
    return iter(
        ShardStream(
            shards, sample_transform=augment, batch_collate=collate,
            batch_size=cfg.data.batch_size_per_rank, seed=0, rank=0, world_size=1, n_streams=1,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
    )  # fmt: skip


def time_mode(cfg, mode: str, shards: list[str], batches: int, device: str = "cpu") -> dict:
    import torch

    from pretrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
    from pretrain.data.photometric import batch_to_device

    output = {"before": "normalized", "uint8": "uint8", "device": "geometric"}[mode]
    it = stream(cfg, output, shards)
    next(it)  # fill the shuffle buffer, warm the caches
    start = time.perf_counter()
    got = [next(it) for _ in range(batches)]
    loader_s = time.perf_counter() - start
    images = batches * cfg.data.batch_size_per_rank
    row = {"mode": mode, "images": images, "loader_images_per_sec_per_core": images / loader_s,
           "batch_bytes": sum(v.numel() * v.element_size() for v in got[0].values()
                              if torch.is_tensor(v))}  # fmt: skip
    if mode != "before":  # what is left for the device: copy, (photometric), normalise
        target = torch.device(device)
        batch_to_device(got[0], target, IMAGENET_MEAN, IMAGENET_STD)  # warm (kernels, constants)
        if target.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in got:
            batch_to_device(batch, target, IMAGENET_MEAN, IMAGENET_STD)
        if target.type == "cuda":
            torch.cuda.synchronize()
        row["device_part_s_per_batch"] = (time.perf_counter() - start) / batches
        row["device"] = device
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--geometry", nargs="+", default=list(GEOMETRIES), choices=list(GEOMETRIES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=4, help="timed batches per mode and round")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=512, help="images written into the shards")
    p.add_argument("--device", default="cpu", help="where the device part is timed (cpu, cuda)")
    add_jsonl_arg(p, "loader")
    args = p.parse_args()

    import torch

    from pretrain.config import load_train_config

    torch.set_num_threads(1)  # one loader core, as a DataLoader worker has
    rows = RowWriter.from_args(args, "loader")
    load = os.getloadavg()
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.geometry:
            g = GEOMETRIES[name]
            pattern = write_data(Path(tmp) / name, g, args.images)
            shards = sorted(str(s) for s in Path(tmp, name).glob("*.tar"))
            cfg = load_train_config(str(REPO / "configs/pretrain/vits14.yaml"), [
                f"data.shards={pattern}", f"data.batch_size_per_rank={args.batch}",
                "data.shuffle_buffer=64", f"model.patch_size={g['patch']}",
                f"crops.global_crops_size={g['global_size']}",
                f"crops.local_crops_size={g['local_size']}",
                f"crops.local_crops_number={g['n_local']}"])  # fmt: skip
            per_mode: dict[str, list[dict]] = {m: [] for m in MODES}
            for round_ in range(args.rounds):
                for mode in MODES:
                    row = {"geometry": name, "round": round_, **time_mode(cfg, mode, shards,
                                                                         args.batches, args.device)}  # fmt: skip
                    per_mode[mode].append(rows.write(row))
                    print(json.dumps(row), flush=True)
            base = statistics.median(
                r["loader_images_per_sec_per_core"] for r in per_mode["before"]
            )
            for mode in MODES:
                ips = statistics.median(r["loader_images_per_sec_per_core"] for r in per_mode[mode])
                line = {"geometry": name, "mode": mode, "median_images_per_sec_per_core": ips,
                        "ratio_vs_before": ips / base, "rounds": args.rounds,
                        "batch_bytes": per_mode[mode][0]["batch_bytes"]}  # fmt: skip
                if mode != "before":
                    line["device_part_s_per_batch"] = statistics.median(
                        r["device_part_s_per_batch"] for r in per_mode[mode]
                    )
                summary.append(rows.write({"summary": True, **line}))
    after = os.getloadavg()
    print(f"\nload average before: {load[0]:.2f}; after: {after[0]:.2f}")
    print(f"| geometry | loader output | images/s per core | vs before | batch MB | device part ({args.device}) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for s in summary:
        dev = s.get("device_part_s_per_batch")
        dev_text = f"{1000 * dev:.0f} ms/batch" if dev is not None else "-"
        print(f"| {s['geometry']} | {s['mode']} | {s['median_images_per_sec_per_core']:.1f} | "
              f"{s['ratio_vs_before']:.2f}x | {s['batch_bytes'] / 1e6:.1f} | {dev_text} |")  # fmt: skip


if __name__ == "__main__":
    main()
