"""Fixtures of the pipeline tests: one local Ray cluster for the session, a loopback HTTP image
server with fault endpoints, and a small simulated web with planted duplicates."""

from __future__ import annotations

import os
import signal
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
    """One real Ray head node (`ray start --head --block` on 127.0.0.1) shared by every Ray test:
    yields (GCS address, dashboard URL for `ray job submit`).

    It runs in its own process group, and teardown signals only that group: `ray stop` would
    kill every Ray process on the machine, other people's clusters included."""
    temp = tmp_path_factory.mktemp("ray")
    port, dashboard_port = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Job drivers run `python` from PATH: make it this virtualenv's.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", "--disable-usage-stats", f"--temp-dir={temp}"]  # fmt: skip
    # The agents' default ports are fixed: another Ray on this machine (a local ray.init, a
    # benchmark) would hold them and the job agent would never come up. Use free ones.
    cmd += [*agent_port_flags(), f"--ray-client-server-port={_free_port()}"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    # The job agent comes up seconds after the head; wait until it answers.
    list_jobs = [ray_bin, "job", "list", "--address", dashboard]
    ready = wait_for(
        lambda: head.poll() is None
        and subprocess.run(list_jobs, env=env, capture_output=True, timeout=60).returncode == 0,
        timeout_s=120, every_s=1.0,
    )  # fmt: skip
    try:
        assert ready, "the Ray head node did not come up"
        yield f"127.0.0.1:{port}", dashboard
    finally:
        _stop_group(head)


def agent_port_flags() -> list[str]:
    """`ray start` flags giving a node's agents free ports: their defaults are fixed, so a second
    Ray on this machine (another node, a local ray.init, a benchmark) would clash."""
    return [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port")]  # fmt: skip


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, ProcessLookupError):  # ProcessLookupError: all gone
        pass
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived the head
        except ProcessLookupError:
            pass


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
