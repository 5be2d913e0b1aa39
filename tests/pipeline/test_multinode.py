"""A crawl on a real two-node Ray cluster (two raylets on 127.0.0.1, `ray start`): the shard
tasks spread over both nodes instead of packing onto the one holding their arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import _free_port, _stop_group, agent_port_flags, wait_for

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
# The suite turns Ray's multi-node mode off (local clusters bind to loopback only); on here.
ENV = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")


def _nodes_alive(address: str) -> int:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe, address], capture_output=True,
                            text=True, timeout=60, env=ENV)  # fmt: skip
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node of 2 CPUs each, in their own process groups."""
    temp = tmp_path_factory.mktemp("ray2")
    port = _free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
         f"--temp-dir={temp}", f"--ray-client-server-port={_free_port()}", *common,
         *agent_port_flags()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=ENV,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    procs = [head]
    try:
        assert wait_for(lambda: _nodes_alive(address) == 1, timeout_s=120, every_s=1.0)
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", *common, *agent_port_flags()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=ENV,
        )  # fmt: skip
        procs.append(worker)
        assert wait_for(lambda: _nodes_alive(address) == 2, timeout_s=120, every_s=1.0)
        yield address
    finally:
        for proc in reversed(procs):
            _stop_group(proc)


def test_crawl_shards_spread_over_nodes(two_nodes, image_server, small_web, url_file, tmp_path):
    """4 shards on 2 nodes of 2 CPUs: 2 shards each. Each shard's input table carries
    captions (about 200 KB a shard), so it lives in the driver node's object store, where Ray's
    default policy would run every shard (half-CPU reservations: 4 fit on one node)."""
    paths = small_web.paths()[:48]
    urls = url_file(tmp_path / "urls.parquet", [image_server.url(p) for p in paths],
                    caption=[f"{p} " + "x" * 16_000 for p in paths])  # fmt: skip
    out = tmp_path / "run"
    env = dict(ENV, PYTHONPATH=str(REPO), RAY_ADDRESS=two_nodes)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(REPO / "configs/pipeline/crawl.yaml"),
         f"input.urls={urls}", f"output_dir={out}", "crawl.shard_size=12",
         "crawl.allow_private_networks=true", "crawl.threads_per_task=4"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    per_node = summary["crawl"]["shards_per_node"]
    assert sorted(per_node.values()) == [2, 2], per_node
    table = pq.read_table(sorted((out / "crawl").glob("*.parquet")))
    assert table.num_rows == len(paths)
    assert table["caption"].to_pylist()[5].startswith(paths[5])
