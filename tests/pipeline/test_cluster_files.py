"""The cluster launch files parse, and the commands in them are ones the CLI accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from pipeline.config import PipelineConfig
from pretrain.configtools import load_config

REPO = Path(__file__).resolve().parents[2]


def _check_pipeline_command(command: str) -> None:
    argv = shlex.split(command)
    start = argv.index("pipeline")
    assert argv[start - 2 : start + 2] == ["python", "-m", "pipeline", "run"]
    config, overrides = argv[start + 2], argv[start + 3 :]
    assert (REPO / config).is_file()
    cfg = load_config(PipelineConfig, REPO / config, overrides)  # raises on a misspelt key
    assert cfg.output_dir and cfg.input.urls


def test_kuberay_rayjob_runs_the_pipeline_cli():
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    _check_pipeline_command(job["spec"]["entrypoint"])
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert spec["workerGroupSpecs"][0]["replicas"] >= 1


def test_ray_cluster_launcher_config_and_its_submit_example():
    text = (REPO / "cluster/ray/cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    for key in ("cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cluster, key
    example = " ".join(
        line.lstrip("# ").rstrip("\\ ") for line in text.splitlines() if line.startswith("#   ")
    )
    submit = example[example.index("ray job submit") :].split("ray down")[0]
    _check_pipeline_command(submit[submit.index("python") :])
