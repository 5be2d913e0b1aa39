"""How well an embedder's semantic dedup finds planted copies, per threshold.

    python bench/semdedup_planted.py                       # the test fixture (vit_test, 56 px)
    python bench/semdedup_planted.py --checkpoint dinov2_vits14_pretrain.pth --size 224
    python bench/semdedup_planted.py --data scenes \
        --checkpoint tests/fixtures/vit_test_copy_embedder.safetensors

A simulated web (crops of the scikit-image photographs, seed 5) with planted semantic copies
(variant 0: cropped by 2-8% per side and colour/brightness-shifted; variant 1: rescaled to 60%
and re-encoded at quality 60), crawled as the pipeline stores images (short side 256), embedded
with `pipeline.stages.embed`, deduplicated with `pipeline.stages.semdedup` at each threshold.
Reported per threshold: the share of planted copies merged with their original (recall), and
the number of distinct images merged into another distinct image's component (false merges).
With `--data photos` (the default) the distinct images are random crops of 21 photographs, so
two of them can overlap heavily: some "false merges" are crops a copy detector would call copies
too (the hard case, kept). With `--data scenes` they are generated pictures that share no
content (`pipeline.simweb.random_scene`, web seed 5; the copy fixture trained on seed 123).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.config import CrawlConfig, EmbedConfig, SemDedupConfig
from pipeline.imaging import process_image
from pipeline.simweb import build_web
from pipeline.stages.embed import Embedder, embed_samples
from pipeline.stages.semdedup import semantic_dedup

FIXTURE = Path(__file__).resolve().parents[1] / "tests/fixtures/vit_test_embedder.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(FIXTURE))
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--groups", type=int, default=30)
    parser.add_argument("--thresholds", default="0.8,0.85,0.9,0.95,0.97,0.99")
    parser.add_argument("--data", choices=["photos", "scenes"], default="photos")
    parser.add_argument("--features", choices=["cls", "cls_patch_mean"], default="cls")
    parser.add_argument("--seed", type=int, default=5, help="the web's seed")
    args = parser.parse_args()
    web = build_web(
        args.images, seed=args.seed, n_semantic=args.groups, scenes=args.data == "scenes"
    )
    crawl = CrawlConfig()
    paths = sorted(web.images)
    samples = [(p, process_image(web.images[p], crawl).jpeg) for p in paths]
    embedder = Embedder(
        EmbedConfig(checkpoint=args.checkpoint, image_size=args.size, features=args.features)
    )
    keys, feats, _ = embed_samples(embedder, samples)
    areas = np.ones(len(keys), np.int64)
    copies = web.semantic_duplicates
    print(f"{args.checkpoint}, {args.size} px: {len(keys) - len(copies)} distinct images, "
          f"{len(copies)} planted copies of {args.groups} originals")  # fmt: skip
    index = {k: i for i, k in enumerate(keys)}
    f = feats.astype(np.float32)
    copy_cos = [float(f[index[c]] @ f[index[o]]) for c, o in copies.items()]
    rows = [index[k] for k in keys if k not in copies]
    sim = f[rows] @ f[rows].T
    np.fill_diagonal(sim, -1.0)
    print(
        f"lowest copy-to-original cosine {min(copy_cos):.3f}; highest cosine between two "
        f"distinct images {sim.max():.3f} (a threshold separates them when the first is higher)"
    )
    print("| threshold | copies caught (variant 0 / 1) | distinct images merged |")
    print("|---|---|---|")
    for threshold in (float(t) for t in args.thresholds.split(",")):
        table, _ = semantic_dedup(
            [feats], keys, areas, SemDedupConfig(threshold=threshold, max_component_share=1.0)
        )
        label = dict(zip(keys, table["component"].to_pylist()))
        caught = [label[c] == label[o] for c, o in copies.items()]
        by_variant = [np.mean([ok for ok, c in zip(caught, copies) if c.endswith(f"-{v}.jpg")])
                      for v in (0, 1)]  # fmt: skip
        distinct = [k for k in keys if k not in copies]
        sizes: dict[int, int] = {}
        for k in distinct:
            sizes[label[k]] = sizes.get(label[k], 0) + 1
        merged = sum(n for n in sizes.values() if n > 1)
        print(f"| {threshold} | {np.mean(caught):.2f} ({by_variant[0]:.2f} / {by_variant[1]:.2f})"
              f" | {merged} of {len(distinct)} |")  # fmt: skip


if __name__ == "__main__":
    main()
