"""`ray job submit --working-dir .` round trip against the shared head node (about 30 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_the_crawl(ray_dashboard, image_server, url_file, tmp_path):
    urls = url_file(
        tmp_path / "urls.parquet", [image_server.url(f"img/{i:06d}.jpg") for i in range(5)]
    )
    out = tmp_path / "run"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_bin, "job", "submit", "--address", ray_dashboard, "--working-dir", ".", "--",
           "python", "-m", "pipeline", "run", "configs/pipeline/crawl.yaml", f"input.urls={urls}",
           f"output_dir={out}", "crawl.allow_private_networks=true", "crawl.shard_size=3"]  # fmt: skip
    for _ in range(24):
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        # The head's job agent registers some seconds after the dashboard answers; Ray says
        # "please try again later" until then.
        if "No available agent" not in result.stderr:
            break
        time.sleep(5)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout
    table = pq.read_table(sorted((out / "crawl").glob("*.parquet")))
    assert table["status"].to_pylist() == ["success"] * 5
    assert sorted(p.name for p in (out / "crawl").glob("*.tar")) == ["00000.tar", "00001.tar"]
