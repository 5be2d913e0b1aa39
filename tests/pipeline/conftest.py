"""Fixtures of the pipeline tests: one local Ray cluster for the session, a loopback HTTP image
server with fault endpoints, and a small simulated web with planted duplicates."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import CrawlConfig
from pipeline.simweb import ImageServer, build_web

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def small_web():
    """40 distinct images, 4 exact and 4 near duplicates, 3 broken URLs."""
    return build_web(40, seed=1, n_exact=4, n_near=4, n_broken=3)


@pytest.fixture(scope="session")
def image_server(small_web):
    with ImageServer(small_web, slow_s=2.0) as server:
        yield server


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One real Ray head node (`ray start --head` on 127.0.0.1) shared by every Ray test:
    yields (GCS address, dashboard URL for `ray job submit`)."""
    temp = tmp_path_factory.mktemp("ray")
    port, dashboard_port = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Job drivers run `python` from PATH: make it this virtualenv's.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", "--disable-usage-stats", f"--temp-dir={temp}"]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ray_address(ray_head):
    return ray_head[0]


@pytest.fixture(scope="session")
def ray_dashboard(ray_head):
    return ray_head[1]


@pytest.fixture
def crawl_cfg() -> CrawlConfig:
    return CrawlConfig(
        allow_private_networks=True, read_timeout_s=1.0, connect_timeout_s=1.0, total_timeout_s=1.5,
        retries=1, backoff_s=0.05, threads_per_task=8, max_bytes=1_000_000, shard_size=16,
    )  # fmt: skip


def write_url_file(path: Path, urls: list[str], **extra_columns) -> Path:
    table = pa.table({"url": urls, **extra_columns})
    pq.write_table(table, path)
    return path


@pytest.fixture
def url_file():
    return write_url_file


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float = 60.0, every_s: float = 0.1) -> bool:
    end = time.time() + timeout_s
    while time.time() < end:
        if predicate():
            return True
        time.sleep(every_s)
    return False


@pytest.fixture
def wait():
    return wait_for
