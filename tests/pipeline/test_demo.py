"""The demo (what `make demo` runs), at a small size: the crawl step on a local Ray cluster of its
own, then the curation, the gallery, the fork + random control and the closing report through
the CLI on the shared cluster (the fixture ViT stands in for the round-0 embedder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.demo import SEED_PHOTOS, crawl_overrides, report, run_crawl

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests/fixtures/vit_test_embedder.safetensors"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        run_dir = run_crawl(out, images=30, seed=3, shard_size=16)
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    assert run_dir == out / "run"
    return out


def test_demo_crawls_the_simulated_web_on_local_ray(demo_dir):
    run_dir = demo_dir / "run"
    table = pq.read_table(sorted((run_dir / "crawl").glob("*.parquet")))
    assert table.num_rows == 33  # 30 images + 1 exact + 1 near duplicate + 1 broken URL
    assert table["status"].to_pylist().count("success") == 32
    dedup = json.loads((run_dir / "dedup" / "summary.json").read_text())
    assert (dedup["exact_duplicates"], dedup["near_duplicates"], dedup["survivors"]) == (1, 1, 30)
    # The URL list's `label` (the source photograph) is carried into every sample's json, where
    # `python -m pretrain.eval` reads it; duplicates carry their original's label.
    from pipeline.shardio import iter_tar_samples
    from pipeline.simweb import PHOTOS

    rows = {r["key"]: r for r in table.to_pylist()}
    seen = 0
    for tar in sorted((run_dir / "crawl").glob("*.tar")):
        for key, files in iter_tar_samples(tar):
            meta = json.loads(files["json"])
            assert meta["label"] == rows[key]["label"] and meta["label"] in PHOTOS
            seen += 1
    assert seen == 32
    # Beside the web: held-aside seed images and a labelled eval set of the seed domain.
    assert len(list((demo_dir / "seeds").glob("*.jpg"))) == 10 * len(SEED_PHOTOS)
    for split, n in (("train", 60), ("val", 60)):
        folders = sorted(p.name for p in (demo_dir / "eval" / split).iterdir())
        assert folders == sorted(SEED_PHOTOS)
        assert all(len(list((demo_dir / "eval" / split / f).glob("*.jpg"))) == n for f in folders)
    # A rerun does not build the web again: the crawl is done.
    before = (demo_dir / "urls.parquet").read_bytes()
    assert run_crawl(demo_dir, images=30, seed=3, shard_size=16) == run_dir
    assert (demo_dir / "urls.parquet").read_bytes() == before


def _cli(*args: str, address: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=address)
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=280)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_demo_curation_control_and_report(demo_dir, ray_address):
    """Steps 3-5 of `make demo` with the Makefile's commands at a small size; the report's
    figures recomputed here from the manifests and the web's labels."""
    config = "configs/pipeline/curate.yaml"
    common = crawl_overrides(demo_dir, 16) + [
        f"embed.checkpoint={FIXTURE}", "embed.image_size=56", "semdedup.threshold=0.95",
        "cluster.levels=[4,2]", "cluster.resampling_steps=[1,2]", "cluster.sample_sizes=[0,0]",
        "curate.target_size=12", "curate.shard_size=5"]  # fmt: skip
    run, control = demo_dir / "run", demo_dir / "random"
    _cli("run", config, f"output_dir={run}", *common, f"curate.seeds={demo_dir / 'seeds'}",
         "curate.retrieval=sample", "curate.per_seed=1", address=ray_address)  # fmt: skip
    _cli("manifest", "gallery", str(run), address=ray_address)
    assert (run / "gallery" / "index.html").stat().st_size > 10_000
    for _ in range(2):  # the second fork of a rerun is a no-op
        _cli("fork", str(run), str(control), "--through", "cluster", "--exist-ok",
             address=ray_address)  # fmt: skip
    _cli("run", config, f"output_dir={control}", *common, "stages=[curate,write]",
         "curate.mode=random", address=ray_address)  # fmt: skip
    (demo_dir / "knn_curated.json").write_text(json.dumps({"knn_top1_k10": 0.5}))
    out = report(demo_dir)

    labels = {}
    for shard in sorted((run / "crawl").glob("*.parquet")):
        t = pq.read_table(shard).to_pydict()
        labels.update(zip(t["key"], t["label"]))
    manifest = pq.read_table(run / "curated" / "manifest.parquet").to_pylist()
    retrieved = [labels[r["source_key"]] for r in manifest if r["selected_by"] == "retrieval"]
    assert retrieved and out["curated"]["by_selected_by"]["retrieval"]["samples"] == len(retrieved)
    precision = sum(x in SEED_PHOTOS for x in retrieved) / len(retrieved)
    assert out["curated"]["by_selected_by"]["retrieval"]["seed_domain_share"] == round(precision, 4)
    assert out["curated"]["samples"] == out["random"]["samples"] == 12
    random_rows = pq.read_table(control / "curated" / "manifest.parquet").to_pylist()
    share = sum(labels[r["source_key"]] in SEED_PHOTOS for r in random_rows) / 12
    assert out["random"]["seed_domain_share"] == round(share, 4)
    counts = out["counts"]
    assert (counts["urls"], counts["fetched"], counts["embedded"]) == (33, 32, 30)
    assert counts["kept_pool"] + counts["semantic_duplicates"] == counts["embedded"]
    assert out["knn"] == {"curated": {"knn_top1_k10": 0.5}}
    text = (demo_dir / "report.md").read_text()
    assert "retrieval precision" in text and "| round 1 on the curated set | 0.500 |" in text
