"""`ray job submit --working-dir .` round trip against the shared head node (about 30 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]


def _submit(dashboard: str, config: str, *overrides: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python -m pipeline run CONFIG OVERRIDES...`"""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_bin, "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
           "python", "-m", "pipeline", "run", config, *overrides]  # fmt: skip
    for _ in range(24):
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        # The head's job agent registers some seconds after the dashboard answers; Ray says
        # "please try again later" until then.
        if "No available agent" not in result.stderr:
            break
        time.sleep(5)
    return result


def test_ray_job_submit_runs_the_crawl(ray_dashboard, image_server, url_file, tmp_path):
    urls = url_file(
        tmp_path / "urls.parquet", [image_server.url(f"img/{i:06d}.jpg") for i in range(5)]
    )
    out = tmp_path / "run"
    result = _submit(ray_dashboard, "configs/pipeline/crawl.yaml", f"input.urls={urls}",
                     f"output_dir={out}", "crawl.allow_private_networks=true",
                     "crawl.shard_size=3")  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout
    table = pq.read_table(sorted((out / "crawl").glob("*.parquet")))
    assert table["status"].to_pylist() == ["success"] * 5
    assert sorted(p.name for p in (out / "crawl").glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_ray_job_submit_runs_the_whole_curation(ray_dashboard, image_server, small_web, url_file,
                                                 tmp_path):  # fmt: skip
    """configs/pipeline/curate.yaml as a Ray job: every stage on the cluster, curated shards that
    validate against their manifest; the run records which backbone embedded it."""
    import json

    originals = sorted(p for p in small_web.images if "-" not in Path(p).name)
    urls = url_file(tmp_path / "urls.parquet", [image_server.url(p) for p in originals[:30]])
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for p in originals[30:34]:  # images the pool does not hold
        (seeds / Path(p).name).write_bytes(small_web.images[p])
    fixture = REPO / "tests/fixtures/vit_test_embedder.safetensors"
    out = tmp_path / "run"
    result = _submit(ray_dashboard, "configs/pipeline/curate.yaml", f"input.urls={urls}",
                     f"output_dir={out}", "crawl.allow_private_networks=true",
                     "crawl.shard_size=16", f"embed.checkpoint={fixture}", "embed.image_size=56",
                     "semdedup.threshold=0.95", "cluster.levels=[4,2]",
                     "cluster.resampling_steps=[1,2]", "cluster.sample_sizes=[0,0]",
                     f"curate.seeds={seeds}", "curate.retrieval=sample", "curate.per_seed=2",
                     "curate.target_size=12", "curate.shard_size=5")  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout
    layout_states = {p.stem: json.loads(p.read_text())["state"] for p in (out / "stages").iterdir()}
    assert layout_states == dict.fromkeys(
        ["crawl", "dedup", "embed", "semdedup", "cluster", "curate", "write"], "done"
    )
    from pipeline.manifest import summary, validate

    report = validate(out)
    assert report["ok"] and report["curated_samples"] == 12
    backbone = summary(out)["embed"]["backbone"]
    from pretrain.models.loading import file_sha256

    assert backbone["sha256"] == file_sha256(fixture) and backbone["source"] == str(fixture)
    shards = (out / "train_shards.txt").read_text().split()
    assert shards == [f"curated/shards/{i:06d}.tar" for i in range(3)]


def test_pipeline_submit_runs_the_crawl_and_reports_it(ray_dashboard, image_server, url_file,
                                                       tmp_path):  # fmt: skip
    """`python -m pipeline submit` from outside the checkout: the job carries the project (the
    default `code` runtime_env), its id comes first, the log follows, then status and logs."""
    urls = url_file(
        tmp_path / "urls.parquet", [image_server.url(f"img/{i:06d}.jpg") for i in range(4)]
    )
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    result = cli("submit", str(REPO / "configs/pipeline/crawl.yaml"), f"input.urls={urls}",
                 f"output_dir={out}", "--address", ray_dashboard,
                 "crawl.allow_private_networks=true", "crawl.shard_size=2")  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    job = result.stdout.splitlines()[0]
    assert job.startswith("raysubmit_")
    assert "crawl finished: 2 shards crawled" in result.stdout
    assert f"job {job}: SUCCEEDED" in result.stderr
    assert pq.read_table(sorted((out / "crawl").glob("*.parquet"))).num_rows == 4
    status = cli("status", job, "--address", ray_dashboard, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = cli("logs", job, "--address", ray_dashboard)
    assert logs.returncode == 0 and "crawl finished" in logs.stdout
