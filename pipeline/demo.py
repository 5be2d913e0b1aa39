"""The demo's own steps (``make demo`` runs the whole flow; each other step is a plain CLI call).

    python -m pipeline.demo crawl --output-dir DIR [--images N]    # web, seeds, eval set, crawl
    python -m pipeline.demo report --output-dir DIR                  # the closing table

``crawl`` builds a few thousand images from scikit-image's bundled photographs (random crops,
300-1600 px, colour changes, planted exact and near duplicates, some broken URLs), serves them
from 127.0.0.1 and crawls them with ``configs/pipeline/curate.yaml`` (stages crawl and dedup) on
a local Ray cluster into ``DIR/run``. Beside the web it writes what the curation is asked for:

- ``DIR/seeds/``: held-aside crops of a few of the photographs (``SEED_PHOTOS``), the domain "I
  want more of" (none of them is in the web);
- ``DIR/eval/{train,val}/<photo>/``: more held-aside crops of those photographs, labelled by
  photograph: the k-NN evaluation of the seed domain.

``report`` reads what the later steps wrote (the curated run, the random control, the k-NN
results) and prints the counts per stage, the retrieval precision (the share of retrieved images
cut from a seed photograph; the demo knows each image's source), the k-NN table and where every
output is; it writes the same to ``DIR/report.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import manifest, plan
from pipeline.cli import prepare_run
from pipeline.layout import RunLayout
from pipeline.simweb import ImageServer, build_web, load_named_photos, photo_crop_jpeg
from pretrain.configtools import atomic_write_text

log = logging.getLogger("pipeline.demo")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "curate.yaml"
# Grey textures and objects: a domain that is a minority of the web (4 photographs of ~20).
SEED_PHOTOS = ("brick", "grass", "gravel", "coins")


def crawl_overrides(output_dir: Path, shard_size: int) -> list[str]:
    """The input and crawl settings every later pipeline call on DIR/run must repeat (the
    Makefile's DEMO_CRAWL spells the same)."""
    return [f"input.urls={output_dir / 'urls.parquet'}", f"crawl.shard_size={shard_size}",
            "crawl.allow_private_networks=true"]  # fmt: skip


def write_domain_sets(output_dir: Path, seed: int, n_seeds: int = 10, n_train: int = 60,
                      n_val: int = 60) -> dict[str, int]:  # fmt: skip
    """Held-aside crops of SEED_PHOTOS: DIR/seeds/*.jpg and DIR/eval/{train,val}/<photo>/*.jpg
    (per photograph). Another random stream than the web's, so none is one of its images."""
    rng = random.Random(10_000 + seed)
    photos = dict(load_named_photos())
    missing = [p for p in SEED_PHOTOS if p not in photos]
    if missing:
        raise RuntimeError(f"scikit-image lacks the demo's seed photographs {missing}")
    counts = {"seeds": 0, "eval_train": 0, "eval_val": 0}
    for name in SEED_PHOTOS:
        for folder, n, count in ((output_dir / "seeds", n_seeds, "seeds"),
                                 (output_dir / "eval" / "train" / name, n_train, "eval_train"),
                                 (output_dir / "eval" / "val" / name, n_val, "eval_val")):  # fmt: skip
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / (f"{name}-{i:03d}.jpg" if count == "seeds" else f"{i:03d}.jpg")
                data = photo_crop_jpeg(photos[name], rng)
                if not path.exists():  # a rerun keeps what the curation already embedded
                    path.write_bytes(data)
                counts[count] += 1
    return counts


def run_crawl(output_dir: Path, images: int = 1500, seed: int = 0, shard_size: int = 500) -> Path:
    """Build, serve and crawl the simulated web (stages crawl + dedup); return DIR/run."""
    from pipeline.runner import run_pipeline

    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    run_dir = output_dir / "run"
    sets = write_domain_sets(output_dir, seed)
    layout = RunLayout(run_dir)
    if all(plan.is_done(plan.read_state(layout, s)) for s in ("crawl", "dedup")):
        log.info("the crawl of %s is done: not building the web again", run_dir)
        print(manifest.render("summary", manifest.summary(run_dir)))
        return run_dir
    n_dup = max(1, images // 50)
    web = build_web(images, seed=seed, n_exact=n_dup, n_near=n_dup, n_broken=n_dup)
    log.info("built %d images and the seed/eval sets %s in %.1f s", len(web.images), sets,
             time.time() - started)  # fmt: skip
    with ImageServer(web) as server:
        paths = web.paths()
        pq.write_table(
            pa.table(
                {
                    "url": [server.url(p) for p in paths],
                    "source_path": paths,
                    # carried into each sample's json and manifest row: the photograph a crop
                    # came from, which the report uses to score retrieval
                    "label": [web.sources.get(p, "") for p in paths],
                }
            ),
            output_dir / "urls.parquet",
        )
        overrides = crawl_overrides(output_dir, shard_size) + [
            f"output_dir={run_dir}", "stages=[crawl,dedup]"]  # fmt: skip
        cfg, total = prepare_run(str(CONFIG), overrides)
        from pretrain.configtools import save_config

        save_config(cfg, run_dir / "config.yaml")
        run_pipeline(cfg, total)
    print(manifest.render("summary", manifest.summary(run_dir)))
    print(f"planted: {n_dup} exact, {n_dup} near duplicates, {n_dup} broken URLs")
    print(f"run directory: {run_dir}  ({time.time() - started:.0f} s in all)")
    return run_dir


# -- the closing table ------------------------------------------------------------------------


def _labels(run_dir: Path) -> dict[str, str]:
    """Pool key -> source photograph, from the crawl manifests (the URL list's label column)."""
    out = {}
    for shard in sorted((run_dir / "crawl").glob("*.parquet")):
        table = pq.read_table(shard, columns=["key", "label"]).to_pydict()
        out.update(zip(table["key"], table["label"]))
    return out


def curated_composition(run_dir: Path) -> dict:
    """Share of the seed domain among the retrieved samples, the whole curated set and the pool."""
    labels = _labels(run_dir)
    rows = pq.read_table(run_dir / "curated" / "manifest.parquet",
                         columns=["source_key", "selected_by"]).to_pylist()  # fmt: skip
    pool = pq.read_table(run_dir / "clusters" / "assignments.parquet", columns=["key"])
    pool_keys = pool["key"].to_pylist()

    def share(keys: list[str]) -> float | None:
        known = [labels[k] for k in keys if k in labels]
        return round(sum(x in SEED_PHOTOS for x in known) / len(known), 4) if known else None

    by = {}
    for how in sorted({r["selected_by"] for r in rows}):
        keys = [r["source_key"] for r in rows if r["selected_by"] == how]
        by[how] = {"samples": len(keys), "seed_domain_share": share(keys)}
    return {"samples": len(rows), "seed_domain_share": share([r["source_key"] for r in rows]),
            "pool": len(pool_keys), "pool_seed_domain_share": share(pool_keys),
            "by_selected_by": by}  # fmt: skip


def report(output_dir: Path) -> dict:
    run, control = output_dir / "run", output_dir / "random"
    out: dict = {"seed_photos": list(SEED_PHOTOS)}
    summary = manifest.summary(run)
    out["counts"] = manifest.stage_counts(summary)
    out["backbone"] = summary.get("embed", {}).get("backbone")
    out["curated"] = curated_composition(run)
    if (control / "curated" / "manifest.parquet").exists():
        out["random"] = curated_composition(control)
    out["knn"] = {}
    for name in ("round0", "curated", "random", "random_init"):
        path = output_dir / f"knn_{name}.json"
        if path.exists():
            out["knn"][name] = json.loads(path.read_text())
    out["outputs"] = {
        "run": str(run), "curated_shards": str(run / "curated" / "shards"),
        "manifest": str(run / "curated" / "manifest.parquet"),
        "gallery": str(run / "gallery" / "index.html"), "random_control": str(control),
        **{p.name: str(p) for p in sorted(output_dir.glob("round*")) if p.is_dir()},
    }  # fmt: skip
    atomic_write_text(output_dir / "report.json", json.dumps(out, indent=2) + "\n")
    text = render_report(out)
    atomic_write_text(output_dir / "report.md", text)
    return out


def render_report(out: dict) -> str:
    lines = ["## dinoforge demo: what the curation did", "", "| stage | count |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in out["counts"].items()]
    cur = out["curated"]
    retrieved = cur["by_selected_by"].get("retrieval", {})
    lines += ["", f"Seed domain ({', '.join(out['seed_photos'])}): "
              f"{cur['pool_seed_domain_share']:.1%} of the kept pool of {cur['pool']}.", "",
              "| set | samples | seed-domain share |", "|---|---|---|"]  # fmt: skip
    if retrieved:
        lines.append(f"| retrieved (retrieval precision) | {retrieved['samples']} | "
                     f"{retrieved['seed_domain_share']:.1%} |")  # fmt: skip
    for how, row in cur["by_selected_by"].items():
        if how != "retrieval":
            lines.append(
                f"| selected by {how} | {row['samples']} | {row['seed_domain_share']:.1%} |"
            )
    lines.append(f"| curated set | {cur['samples']} | {cur['seed_domain_share']:.1%} |")
    if "random" in out:
        rnd = out["random"]
        lines.append(f"| random sample (control) | {rnd['samples']} | "
                     f"{rnd['seed_domain_share']:.1%} |")  # fmt: skip
    if out["knn"]:
        ks = sorted({k for r in out["knn"].values() for k in r if k.startswith("knn_top1")})
        lines += ["", "k-NN top-1 on the seed domain (held-aside crops, label = photograph):", "",
                  "| backbone | " + " | ".join(k.replace("knn_top1_", "") for k in ks)
                  + " |", "|---" * (len(ks) + 1) + "|"]  # fmt: skip
        names = {"round0": "round 0 (bootstrap, raw crawl)",
                 "curated": "round 1 on the curated set", "random": "round 1 on the random sample",
                 "random_init": "random init"}  # fmt: skip
        for name, result in out["knn"].items():
            cells = " | ".join(f"{result[k]:.3f}" if k in result else "-" for k in ks)
            lines.append(f"| {names.get(name, name)} | {cells} |")
    if out.get("backbone"):
        b = out["backbone"]
        lines += ["", f"Embedded by {b.get('source')} (sha256 {str(b.get('sha256'))[:16]}...)."]
    lines += ["", "Outputs:", ""] + [f"- {k}: {v}" for k, v in out["outputs"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["crawl", "report"])
    parser.add_argument("--output-dir", default="demo_run", type=Path)
    parser.add_argument("--images", type=int, default=1500, help="distinct images in the web")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.step == "crawl":
        run_crawl(args.output_dir, args.images, args.seed, args.shard_size)
    else:
        print(render_report(report(args.output_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
