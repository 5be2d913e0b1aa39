"""A generated shapes dataset: the class is the shape; colour, size, position and background vary.

The shape's colour is any colour; the background is a grey of random level.

Used by the tests ("it learns") and the CPU demo/benchmarks. Writes WebDataset shards in the
crawl's format (`KEY.jpg` + `KEY.json`, the json carrying a `label`) or labelled image folders.

    python -m pretrain.data.synthetic shards OUT_DIR --n 512 --per-shard 128
    python -m pretrain.data.synthetic folders OUT_DIR --n 200
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(
    shape: str, rng: random.Random, size: int = 64, background: str = "grey"
) -> Image.Image:
    """One shape of random colour, size and position on a background of random level: grey
    by default, or of any colour with background="colour" (the set as it was first written).

    Grey is the default on purpose: a background of random hue fills most of the image and
    survives DINOv2's colour jitter, so it identifies an image across views better than its
    shape does, and a short self-supervised run learns background colour instead of shape
    (measured: docs/training.md, "The shapes check").
    """
    if background == "grey":
        level = rng.randrange(0, 256)
        fill = (level, level, level)
    elif background == "colour":
        fill = tuple(rng.randrange(0, 256) for _ in range(3))
    else:
        raise ValueError(f"background must be 'grey' or 'colour', got {background!r}")
    colour = tuple((c + rng.randrange(96, 160)) % 256 for c in fill)  # keep contrast
    img = Image.new("RGB", (size, size), fill)
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.18, 0.38) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "triangle":
        pts = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in (-1.57, 0.52, 2.62)]
        draw.polygon(pts, fill=colour)
    elif shape == "cross":
        w = radius / 3
        draw.rectangle([cx - radius, cy - w, cx + radius, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - radius, cx + w, cy + radius], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def samples(n: int, seed: int, size: int = 64, background: str = "grey"):
    rng = random.Random(seed)
    for i in range(n):
        label = i % len(SHAPES)
        yield f"{seed:04d}{i:07d}", label, draw_shape(SHAPES[label], rng, size, background)


def write_shards(out_dir: str | Path, data, class_names, per_shard: int = 128,
                 prefix: str = "shapes") -> list[str]:  # fmt: skip
    """Write (key, label, image) samples as out_dir/PREFIX-NNNNNN.tar (jpg + json with the
    label); returns the shard paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for key, label, img in data:
            meta = {"key": key, "label": label, "class": class_names[label]}
            sink.write({"__key__": key, "jpg": _jpeg(img), "json": json.dumps(meta).encode()})
    return sorted(str(p) for p in out_dir.glob(f"{prefix}-*.tar"))


def write_folders(out_dir: str | Path, data, class_names) -> Path:
    """Write (key, label, image) samples as out_dir/<class>/<key>.jpg (an ImageFolder)."""
    out_dir = Path(out_dir)
    for key, label, img in data:
        folder = out_dir / class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(_jpeg(img))
    return out_dir


def write_shapes_shards(
    out_dir: str | Path, n: int, per_shard: int = 128, seed: int = 0, size: int = 64
) -> list[str]:
    """Write n shapes as out_dir/shapes-NNNNNN.tar; returns the shard paths."""
    return write_shards(out_dir, samples(n, seed, size), SHAPES, per_shard)


def write_shapes_folders(out_dir: str | Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """Write n shapes as out_dir/<shape>/<key>.jpg (an ImageFolder layout)."""
    return write_folders(out_dir, samples(n, seed, size), SHAPES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=["shards", "folders"])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.layout == "shards":
        paths = write_shapes_shards(args.out_dir, args.n, args.per_shard, args.seed, args.size)
        print(f"wrote {len(paths)} shards to {args.out_dir}")
    else:
        write_shapes_folders(args.out_dir, args.n, args.seed, args.size)
        print(f"wrote {args.n} images to {args.out_dir}")


if __name__ == "__main__":
    main()
