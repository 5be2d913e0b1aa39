"""The demo (what `make demo` runs) on a tiny web, through a local Ray cluster of its own."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipeline.demo import run_demo


def test_demo_crawls_the_simulated_web_on_local_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = run_demo(tmp_path, images=30, seed=3, shard_size=16)
    assert run_dir == tmp_path / "run"
    table = pq.read_table(sorted((run_dir / "crawl").glob("*.parquet")))
    assert table.num_rows == 33  # 30 images + 1 exact + 1 near duplicate + 1 broken URL
    assert table["status"].to_pylist().count("success") == 32
    dedup = json.loads((run_dir / "dedup" / "summary.json").read_text())
    assert (dedup["exact_duplicates"], dedup["near_duplicates"], dedup["survivors"]) == (1, 1, 30)
    assert "success_rate" in capsys.readouterr().out
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
