"""The cluster path as a user takes it, on one machine (README, "On a cluster").

- Ray: a token (`ray get-auth-token --generate`), `ray start --head` (token authentication on,
  as Ray 2.60 does wherever a token exists) and a second raylet as a worker node, both run by
  a Python that has dinoforge's dependencies but not dinoforge; `python -m pipeline submit`
  from another directory with RAY_AUTH_MODE unset sends the crawl and the curate recipe through
  the job API, the job carries the project (`code`, then `pip`), the manifests are checked.
- Pretraining: the README's multi-node torchrun command, two node ranks on this machine (c10d),
  and the Slurm script run as two "nodes" with stand-ins for srun and scontrol.

All slow: a Ray cluster of two nodes and two torchrun jobs, about 2-3 minutes together.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .conftest import _free_port, _stop_group, agent_port_flags, wait_for

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A virtualenv that sees the project venv's packages (a .pth line) but not dinoforge: the
    editable install's finder is a .pth of the venv's own, which a path added this way does not
    run. The cluster's Python on nodes where dinoforge was never installed."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv)})["purelib"])
    (purelib / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    probe = subprocess.run([python, "-c", "import ray, pyarrow, torch; import pipeline"],
                           cwd=venv, capture_output=True, text=True)  # fmt: skip
    assert "No module named 'pipeline'" in probe.stderr, probe.stderr[-2000:]
    return python


def _user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: their HOME (where ~/.ray/auth_token lives), RAY_AUTH_MODE unset."""
    drop = ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HOME": str(home), **extra}


@pytest.fixture(scope="module")
def token_cluster(bare_python, tmp_path_factory):
    """`ray start --head` + a worker node with token auth, on 127.0.0.1, run by `bare_python`
    with its bin first on PATH (the cluster's environment activated); yields (dashboard, HOME)."""
    home = tmp_path_factory.mktemp("home")
    ray = [str(bare_python), "-m", "ray.scripts.scripts"]
    # Multi-node on one machine (the suite turns it off), every process on loopback.
    env = _user_env(home, PATH=f"{bare_python.parent}:{os.environ['PATH']}",
                    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")  # fmt: skip
    subprocess.run([*ray, "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    assert (home / ".ray/auth_token").is_file()
    port, dashboard_port = _free_port(), _free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    procs = [subprocess.Popen(
        [*ray, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={home / 'ray'}",
         f"--ray-client-server-port={_free_port()}", *common, *agent_port_flags()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )]  # fmt: skip
    address = f"127.0.0.1:{port}"
    # A worker node does not turn token auth on by itself: without RAY_AUTH_MODE=token it
    # retries its GCS connection forever ("Authentication token is missing or incorrect").
    token_env = dict(env, RAY_AUTH_MODE="token")
    try:
        assert wait_for(lambda: _nodes_alive(bare_python, address, token_env) == 1, 120, 1.0)
        procs.append(subprocess.Popen(
            [*ray, "start", f"--address={address}", *common, *agent_port_flags()],
            env=token_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        ))  # fmt: skip
        assert wait_for(lambda: _nodes_alive(bare_python, address, token_env) == 2, 120, 1.0)
        yield f"http://127.0.0.1:{dashboard_port}", home
    finally:
        for proc in reversed(procs):
            _stop_group(proc)


def _nodes_alive(python: Path, address: str, env: dict[str, str]) -> int:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")  # fmt: skip
    result = subprocess.run([python, "-c", probe, address], capture_output=True, text=True,
                            timeout=60, env=env)  # fmt: skip
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


def _pipeline(home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The user's client: the project's venv, in a directory outside the checkout."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd,
                          env=_user_env(home), capture_output=True, text=True, timeout=500)  # fmt: skip


def test_submit_crawl_and_curate_to_a_two_node_cluster_with_token_auth(
    token_cluster, image_server, small_web, url_file, tmp_path
):
    dashboard, home = token_cluster
    paths = small_web.paths()
    urls = url_file(tmp_path / "urls.parquet", [image_server.url(p) for p in paths])
    crawl_run = tmp_path / "runs/crawl-001"
    crawl = _pipeline(home, tmp_path, "submit", str(REPO / "configs/pipeline/crawl.yaml"),
                      f"input.urls={urls}", f"output_dir={crawl_run}",
                      "crawl.allow_private_networks=true", "crawl.shard_size=12",
                      "--address", dashboard)  # fmt: skip
    assert crawl.returncode == 0, (crawl.stdout + crawl.stderr)[-5000:]
    job = crawl.stdout.splitlines()[0]
    summary = json.loads(crawl.stdout[crawl.stdout.index("\n{") :])
    assert summary["ok"] and len(summary["crawl"]["shards_per_node"]) == 2  # both nodes crawled
    table = pq.read_table(sorted((crawl_run / "crawl").glob("*.parquet")))
    assert table.num_rows == len(paths)
    statuses = dict(zip(table["url"].to_pylist(), table["status"].to_pylist()))
    broken = {image_server.url(p) for p in small_web.broken}
    assert {u for u, s in statuses.items() if s != "success"} == broken
    from pipeline.manifest import summary as run_summary
    from pipeline.manifest import validate

    assert run_summary(crawl_run)["dedup"]["exact_duplicates"] == len(small_web.exact_duplicates)
    assert validate(crawl_run)["ok"]

    status = _pipeline(home, tmp_path, "status", job, "--address", dashboard, "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["status"] == "SUCCEEDED"
    assert report["runtime_env"]["working_dir"].startswith("gcs://")  # the project travelled
    logs = _pipeline(home, tmp_path, "logs", job, "--address", dashboard)
    assert "crawl finished" in logs.stdout

    # The whole recipe, the job installing the dependencies over each node's Python (`pip`:
    # every one is already there, so pip only checks them).
    originals = sorted(p for p in small_web.images if "-" not in Path(p).name)
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for p in originals[30:34]:
        (seeds / Path(p).name).write_bytes(small_web.images[p])
    curate_run = tmp_path / "runs/curate-001"
    fixture = REPO / "tests/fixtures/vit_test_embedder.safetensors"
    curate = _pipeline(home, tmp_path, "submit", str(REPO / "configs/pipeline/curate.yaml"),
                       f"input.urls={urls}", f"output_dir={curate_run}",
                       "crawl.allow_private_networks=true", "crawl.shard_size=16",
                       f"embed.checkpoint={fixture}", "embed.image_size=56",
                       "semdedup.threshold=0.95", "cluster.levels=[4,2]",
                       "cluster.resampling_steps=[1,2]", "cluster.sample_sizes=[0,0]",
                       f"curate.seeds={seeds}", "curate.retrieval=sample", "curate.per_seed=2",
                       "curate.target_size=12", "curate.shard_size=5",
                       "--address", dashboard, "--runtime-env", "pip")  # fmt: skip
    assert curate.returncode == 0, (curate.stdout + curate.stderr)[-5000:]
    report = validate(curate_run)
    assert report["ok"] and report["curated_samples"] == 12
    job = curate.stdout.splitlines()[0]
    status = _pipeline(home, tmp_path, "status", job, "--address", dashboard, "--json")
    assert "torch>=2.4" in json.loads(status.stdout)["runtime_env"]["pip"]["packages"]


def test_submit_without_the_token_names_the_fix(token_cluster, tmp_path):
    dashboard, _home = token_cluster
    result = _pipeline(tmp_path, tmp_path, "status", "raysubmit_x", "--address", dashboard)
    assert result.returncode == 2
    assert "requires an authentication token (401)" in result.stderr
    assert "RAY_AUTH_MODE=token" in result.stderr


def _readme_block(start: str) -> str:
    """The README command starting with `start`, its continuation lines joined."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^{re.escape(start)}.*?(?<!\\)$", text, flags=re.M | re.S)
    assert match, f"README has no command starting {start!r}"
    return re.sub(r"\\\n\s*", "", match.group(0))


def _shards(tmp_path: Path) -> Path:
    from pretrain.data.synthetic import write_shapes_shards

    shards = tmp_path / "shards"
    write_shapes_shards(shards, n=64, per_shard=32, seed=3)
    return shards


TRAIN_SMALL = ["train.steps=2", "train.log_every=1", "train.checkpoint_every=2",
               "data.num_workers=1", "logging.tensorboard=false"]  # fmt: skip


def _two_nodes(argv: list[str], env: dict[str, str]) -> list[tuple[str, str]]:
    """Run `argv` as two "nodes" on this machine; (stdout, stderr) of each, both exit 0."""
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
             for _node in range(2)]  # fmt: skip
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            _stop_group(p)
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
    return results


def test_readme_two_node_torchrun_on_one_machine(tmp_path):
    """The README's command as written, on two node ranks of this machine: HEAD:29500 becomes a
    free loopback port, 8 GPUs per node 1 process, the ViT-L recipe the tiny CPU one."""
    command = _readme_block("torchrun --nnodes 2")
    port = _free_port()
    for old, new in [("HEAD:29500", f"127.0.0.1:{port}"), ("--nproc-per-node 8", "--nproc-per-node 1"),
                     ("configs/pretrain/vitl14.yaml", "configs/pretrain/vit_test_cpu.yaml"),
                     ("/shared/runs/curate-001", str(_shards(tmp_path))),
                     ("/shared/train/vitl14-001", str(tmp_path / "train"))]:  # fmt: skip
        assert old in command, (old, command)
        command = command.replace(old, new)
    argv = [str(VENV_BIN / "torchrun"), *command.split()[1:], *TRAIN_SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results = _two_nodes(argv, env)
    assert "2 ranks" in results[0][1] + results[1][1]
    metrics = (tmp_path / "train/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]
    assert (tmp_path / "train/teacher_backbone.safetensors").is_file()


def test_slurm_script_runs_two_nodes_with_stand_ins(tmp_path):
    """cluster/slurm/pretrain.sbatch as Slurm would run it on each of 2 nodes: `srun` runs its
    command here, `scontrol show hostnames` names this machine; one torchrun per "node"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[[ $1 == show ]] && echo 127.0.0.1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2",
               SLURM_GPUS_ON_NODE="1", RDZV_PORT=str(_free_port()))  # fmt: skip
    args = ["bash", str(REPO / "cluster/slurm/pretrain.sbatch"), "configs/pretrain/vit_test_cpu.yaml",
            f"data.shards={_shards(tmp_path)}", f"output_dir={tmp_path / 'train'}", *TRAIN_SMALL]  # fmt: skip
    _two_nodes(args, env)
    metrics = (tmp_path / "train/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]
