"""A harder generated set: 10 silhouette classes composited onto crops of real photographs.

Only the outline carries the class. Everything else is a nuisance drawn at random per image:
the background (a random crop of one of scikit-image's bundled photographs, any position and
scale, randomly flipped and colour-shifted), the silhouette's colour, size (a third to two
thirds of the image), position and rotation (up to +-25 degrees). Raw pixels classify it
barely above chance (k-NN, docs/training.md), unlike the grey-background shapes of
`pretrain.data.synthetic`, where the background is nearly constant.

    python -m pretrain.data.silhouettes shards OUT_DIR --n 8000 --per-shard 500
    python -m pretrain.data.silhouettes folders OUT_DIR --n 1000 --seed 2
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

CLASSES = ("circle", "square", "triangle", "cross", "star", "ring", "hexagon", "crescent",
           "arrow", "ell")  # fmt: skip
# Photographs of scikit-image that ship inside its wheel (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "motorcycle_left", "camera", "moon", "coins", "brick", "grass", "gravel", "retina",
          "colorwheel", "logo")  # fmt: skip


@lru_cache(maxsize=1)
def photographs() -> tuple[Image.Image, ...]:
    import skimage.data

    photos = []
    for name in PHOTOS:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # a photo that would need a download: skip it
            continue
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(np.ptp(array), 1e-9)).astype(np.uint8)
        photos.append(Image.fromarray(array).convert("RGB"))
    if not photos:
        raise RuntimeError("no scikit-image photograph could be loaded")
    return tuple(photos)


def _regular(n: int, r: float, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * i / n), r * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]  # fmt: skip


def _outline(name: str) -> list[list[tuple[float, float]]] | str:
    """Polygons in a unit box centred on 0 (radius about 1), or a keyword for round shapes."""
    if name in ("circle", "ring", "crescent"):
        return name
    if name == "square":
        return [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]]
    if name == "triangle":
        return [_regular(3, 1.0, -math.pi / 2)]
    if name == "hexagon":
        return [_regular(6, 0.95)]
    if name == "star":
        outer, inner = _regular(5, 1.0, -math.pi / 2), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return [[p for pair in zip(outer, inner) for p in pair]]
    if name == "cross":
        w = 0.3
        return [[(-1, -w), (1, -w), (1, w), (-1, w)], [(-w, -1), (w, -1), (w, 1), (-w, 1)]]
    if name == "arrow":
        return [[(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25),
                 (-1, 0.25)]]  # fmt: skip
    if name == "ell":
        return [[(-0.7, -1), (-0.2, -1), (-0.2, 0.5), (0.7, 0.5), (0.7, 1), (-0.7, 1)]]
    raise ValueError(f"unknown silhouette {name!r}; expected one of {CLASSES}")


def silhouette_mask(name: str, size: int, radius: float, centre: tuple[float, float],
                    angle: float) -> Image.Image:  # fmt: skip
    """An L-mode mask (255 inside) of one silhouette, drawn 4x larger then reduced (smooth
    edges)."""
    scale = 4
    mask = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = centre[0] * scale, centre[1] * scale, radius * scale
    outline = _outline(name)
    if outline == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif outline == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif outline == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        off = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
        draw.ellipse([cx - r + off[0], cy - r + off[1], cx + r + off[0], cy + r + off[1]], fill=0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        for poly in outline:
            pts = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in poly]
            draw.polygon(pts, fill=255)
    return mask.reduce(scale)


def _background(rng: random.Random, size: int) -> tuple[Image.Image, int]:
    index = rng.randrange(len(photographs()))
    photo = photographs()[index]
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.15, 0.8))
    left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    img = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.7))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    # A random hue rotation: a photo's colours do not give its crops away either.
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + rng.randrange(256)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB"), index


def draw_silhouette(name: str, rng: random.Random, size: int = 64,
                    radius: tuple[float, float] = (0.17, 0.33),
                    max_angle: float = 25.0) -> tuple[Image.Image, int]:  # fmt: skip
    """(image, index of the photograph its background was cut from). `radius` is the range of
    the silhouette's radius as a fraction of the image side."""
    img, photo = _background(rng, size)
    radius_px = rng.uniform(*radius) * size
    centre = (rng.uniform(radius_px, size - radius_px), rng.uniform(radius_px, size - radius_px))
    angle = math.radians(rng.uniform(-max_angle, max_angle))
    mask = silhouette_mask(name, size, radius_px, centre, angle)
    colour = tuple(rng.randrange(256) for _ in range(3))
    img.paste(Image.new("RGB", (size, size), colour), mask=mask)
    return img, photo


@dataclass(frozen=True)
class Variant:
    """How hard the set is. The defaults are the stand-in of docs/training.md; fewer classes,
    larger or upright silhouettes make rungs below it (the photograph backgrounds and random
    colours stay)."""

    classes: int = len(CLASSES)  # the first `classes` of CLASSES
    radius: tuple[float, float] = (0.17, 0.33)  # fraction of the image side
    max_angle: float = 25.0  # degrees either way

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(CLASSES):
            raise ValueError(f"classes must be in [2, {len(CLASSES)}], got {self.classes}")
        low, high = self.radius
        if not 0 < low <= high <= 0.5:
            raise ValueError(f"radius must be (low, high) with 0 < low <= high <= 0.5, got "
                             f"{self.radius}")  # fmt: skip


def samples(n: int, seed: int, size: int = 64,
            variant: Variant = Variant()) -> Iterator[tuple[str, int, Image.Image]]:  # fmt: skip
    """(key, label, image) for n images, classes in turn; the same seed gives the same set."""
    for key, label, _, img in samples_with_background(n, seed, size, variant):
        yield key, label, img


def samples_with_background(n: int, seed: int, size: int = 64, variant: Variant = Variant()):
    """(key, label, background photograph index, image): the nuisance as a label too, to
    measure how much of a backbone's k-NN is background."""
    rng = random.Random(seed)
    for i in range(n):
        label = i % variant.classes
        img, photo = draw_silhouette(CLASSES[label], rng, size, variant.radius,
                                     variant.max_angle)  # fmt: skip
        yield f"{seed:04d}{i:07d}", label, photo, img


def main(argv: list[str] | None = None) -> None:
    from pretrain.data.synthetic import write_folders, write_shards

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=["shards", "folders"])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    data = samples(args.n, args.seed, args.size)
    if args.layout == "shards":
        paths = write_shards(args.out_dir, data, CLASSES, args.per_shard, prefix="silhouettes")
        print(f"wrote {len(paths)} shards to {args.out_dir}")
    else:
        write_folders(args.out_dir, data, CLASSES)
        print(f"wrote {args.n} images to {args.out_dir}")


if __name__ == "__main__":
    main()
