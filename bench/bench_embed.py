"""The embed stage against the bare model forward, same model, batch and device, in one run.

    python bench/bench_embed.py                              # CPU: vit_small/14, 224 px, batch 32
    python bench/bench_embed.py --model vit_large --device cuda --images 8192 --batch 256

- `bare`: the backbone's forward on already-preprocessed, normalised tensors (made once,
  outside the timing), plus the L2 normalisation: the ceiling. It runs in the precision the
  stage's forward runs in on that device (bf16 autocast on CUDA, fp32 on the CPU as the stage
  is written now), read off one call of the stage's `Embedder` rather than assumed, so the
  ratio compares like with like; the row records it (`dtype`, `autocast`).
- `stage`: `pipeline.stages.embed.embed_crawl_shard` on crawl-format shards: read the tar,
  decode each JPEG, resize / crop (a thread pool overlapping the forward), forward, write the
  float16 `.npy`, keys and done marker. What one embedding actor does per shard.
- `stage-ray` (with --ray): the whole stage through the CLI (`stages=[embed]`) on a local Ray
  cluster, start-up of Ray and the actor included, for scale.

Rounds alternate the order (bare, stage, stage, bare, ...); the best round of each is reported
and their ratio. The images are the scikit-image photographs' crops the demo serves, resized
as the crawl stores them (short side 256). Every round and the summary are appended to
`--jsonl` (default runs/bench/embed.jsonl) as they are measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from _rows import RowWriter, add_jsonl_arg

from pipeline.config import CrawlConfig, EmbedConfig
from pipeline.layout import RunLayout
from pipeline.simweb import build_web
from pipeline.stages.crawl import crawl_shard
from pipeline.stages.embed import Embedder, embed_crawl_shard, preprocess
from pretrain.models import build_backbone

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, images: int, shard_size: int) -> RunLayout:
    """Crawl-format shards of `images` demo images (a local folder crawled without Ray)."""
    web = build_web(min(images, 600), seed=0)
    folder = root / "images"
    folder.mkdir()
    names = sorted(web.images)
    for i in range(images):  # repeat the distinct images as needed: decode cost is per image
        (folder / f"{i:06d}.jpg").write_bytes(web.images[names[i % len(names)]])
    files = sorted(str(p) for p in folder.iterdir())
    layout = RunLayout(root / "run")
    crawl = CrawlConfig(shard_size=shard_size)
    for index, start in enumerate(range(0, images, shard_size)):
        table = pa.table({"url": files[start : start + shard_size]})
        crawl_shard(table, index, layout.crawl_dir, crawl, "folder")
    return layout


def stage_precision(embedder: Embedder, images: np.ndarray) -> dict:
    """How the stage's forward runs: autocast on or off, its dtype, the input's dtype, as seen
    from inside the model during one `Embedder` call (hooks on every submodule; the first one
    called reports). Read, not assumed, so the bare path follows the stage if it changes."""
    kind, seen = embedder.device.type, {}

    def probe(module: torch.nn.Module, inputs: tuple) -> None:
        if not seen and inputs and torch.is_tensor(inputs[0]):
            seen["autocast"] = torch.is_autocast_enabled(kind)
            seen["autocast_dtype"] = torch.get_autocast_dtype(kind)
            seen["input_dtype"] = inputs[0].dtype

    hooks = [m.register_forward_pre_hook(probe) for m in embedder.model.modules()]
    try:
        embedder(images)
    finally:
        for hook in hooks:
            hook.remove()
    params = next(embedder.model.parameters()).dtype
    seen["dtype"] = seen["autocast_dtype"] if seen["autocast"] else params
    return seen


def bare_forward(embedder: Embedder, x: torch.Tensor, precision: dict) -> torch.Tensor:
    """The backbone's CLS features of a normalised batch, L2-normalised, in `precision`."""
    kind = embedder.device.type
    autocast = (torch.autocast(kind, dtype=precision["autocast_dtype"]) if precision["autocast"]
                else contextlib.nullcontext())  # fmt: skip
    with torch.inference_mode():
        x = x.to(embedder.device, dtype=precision["input_dtype"])
        with autocast:
            feats = embedder.model(x)
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def bare_round(embedder: Embedder, batches: list[torch.Tensor], precision: dict) -> float:
    started = time.perf_counter()
    for x in batches:
        bare_forward(embedder, x, precision).to(torch.float16).cpu()
    return time.perf_counter() - started


def stage_round(embedder: Embedder, layout: RunLayout) -> float:
    shutil.rmtree(layout.embed_dir, ignore_errors=True)
    started = time.perf_counter()
    for shard in layout.crawl_done():
        embed_crawl_shard(embedder, shard, set(), layout.embed_part(f"{shard.index:05d}"), "b")
    return time.perf_counter() - started


def ray_round(layout: RunLayout, checkpoint: Path, args) -> float:
    shutil.rmtree(layout.embed_dir, ignore_errors=True)
    layout.stage_file("embed").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipeline", "run", str(REPO / "configs/pipeline/curate.yaml"),
           f"output_dir={layout.root}", "stages=[embed]", f"embed.checkpoint={checkpoint}",
           f"embed.batch_size={args.batch}", f"embed.image_size={args.size}",
           f"embed.device={args.device}"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--decode-threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also time the stage through Ray")
    add_jsonl_arg(parser, "embed")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        layout = make_run(root, args.images, args.shard_size)
        checkpoint = root / f"{args.model}.safetensors"
        build_backbone(args.model).save_dinov2_checkpoint(checkpoint)
        cfg = EmbedConfig(checkpoint=str(checkpoint), image_size=args.size, batch_size=args.batch,
                          decode_threads=args.decode_threads, device=args.device)  # fmt: skip
        embedder = Embedder(cfg)
        from pipeline.shardio import iter_tar_samples

        jpegs = [f["jpg"] for s in layout.crawl_done() for _, f in iter_tar_samples(s.tar)]
        images = np.stack([preprocess(j, args.size) for j in jpegs])
        batches = [embedder.normalise(images[i : i + args.batch]).cpu()
                   for i in range(0, len(images), args.batch)]  # fmt: skip
        precision = stage_precision(embedder, images[: args.batch])  # also the stage's warm-up
        # same input, both paths: a difference here means they do not compute alike
        stage_feats = torch.from_numpy(embedder(images[: args.batch])).float()
        bare_feats = bare_forward(embedder, batches[0], precision).to(torch.float16).cpu()
        agreement = float((stage_feats - bare_feats.float()).abs().max())
        bare_round(embedder, batches[:2], precision)  # warm-up
        rows = RowWriter.from_args(args, "embed")
        setting = {"model": args.model, "device": embedder.device.type, "images": len(images),
                   "batch": args.batch, "size": args.size,
                   "dtype": str(precision["dtype"]).removeprefix("torch."),
                   "autocast": precision["autocast"]}  # fmt: skip
        times: dict[str, list[float]] = {"bare": [], "stage": [], "stage-ray": []}
        load_before = os.getloadavg()
        for r in range(args.rounds):
            order = ("bare", "stage") if r % 2 == 0 else ("stage", "bare")
            for name in order:
                seconds = (bare_round(embedder, batches, precision) if name == "bare"
                           else stage_round(embedder, layout))  # fmt: skip
                times[name].append(seconds)
                rows.write({"kind": "round", **setting, "round": r, "path": name,
                            "seconds": seconds, "images_per_s": len(images) / seconds})  # fmt: skip
                print(f"round {r} {name}: {len(images) / seconds:.1f} images/s", flush=True)
            if args.ray:
                times["stage-ray"].append(ray_round(layout, checkpoint, args))
                seconds = times["stage-ray"][-1]
                rows.write({"kind": "round", **setting, "round": r, "path": "stage-ray",
                            "seconds": seconds, "images_per_s": len(images) / seconds})  # fmt: skip
        best = {k: len(images) / min(v) for k, v in times.items() if v}
        result = {
            "model": args.model, "device": args.device, "images": len(images),
            "batch": args.batch, "size": args.size, "torch_threads": torch.get_num_threads(),
            "decode_threads": args.decode_threads, "dtype": setting["dtype"],
            "autocast": precision["autocast"], "bare_vs_stage_max_abs_diff": agreement,
            "images_per_s": best, "ratio_stage_vs_bare": best["stage"] / best["bare"],
            "load_before": load_before, "load_after": os.getloadavg(),
        }  # fmt: skip
        rows.write({"kind": "summary", **result})
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
