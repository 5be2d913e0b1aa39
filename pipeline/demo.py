"""Crawl a simulated web end to end: ``python -m pipeline.demo --output-dir DIR [--images N]``.

Builds a few thousand images from scikit-image's bundled photographs (random crops, 300-1600 px,
colour changes, planted exact and near duplicates, some broken URLs), serves them from
127.0.0.1, crawls them with the pipeline on a local Ray cluster, prints the manifest summary and
returns the run directory (the later stages train on RUN/crawl/*.tar).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest
from pipeline.cli import prepare_run
from pipeline.simweb import ImageServer, build_web

log = logging.getLogger("pipeline.demo")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "crawl.yaml"


def run_demo(output_dir: Path, images: int = 1500, seed: int = 0, shard_size: int = 500) -> Path:
    """Build, serve and crawl the simulated web; return the run directory."""
    from pipeline.runner import run_pipeline

    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    n_dup = max(1, images // 50)
    web = build_web(images, seed=seed, n_exact=n_dup, n_near=n_dup, n_broken=n_dup)
    log.info("built %d images in %.1f s", len(web.images), time.time() - started)
    with ImageServer(web) as server:
        paths = web.paths()
        urls = output_dir / "urls.parquet"
        pq.write_table(
            pa.table(
                {
                    "url": [server.url(p) for p in paths],
                    "source_path": paths,
                    # carried into each sample's json: the photograph a crop came from,
                    # the label `python -m pretrain.eval knn` reads in the full demo
                    "label": [web.sources.get(p, "") for p in paths],
                }
            ),
            urls,
        )
        run_dir = output_dir / "run"
        overrides = [f"input.urls={urls}", f"output_dir={run_dir}", f"crawl.shard_size={shard_size}",
                     "crawl.allow_private_networks=true"]  # fmt: skip
        cfg, total = prepare_run(str(CONFIG), overrides)
        from pretrain.configtools import save_config

        save_config(cfg, run_dir / "config.yaml")
        run_pipeline(cfg, total)
    print(manifest.render("summary", manifest.summary(run_dir)))
    print(f"planted: {n_dup} exact, {n_dup} near duplicates, {n_dup} broken URLs")
    print(f"run directory: {run_dir}  ({time.time() - started:.0f} s in all)")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="demo_run", type=Path)
    parser.add_argument("--images", type=int, default=1500, help="distinct images in the web")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_demo(args.output_dir, args.images, args.seed, args.shard_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
