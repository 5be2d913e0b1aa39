"""The cluster launch files parse, and the commands in them are ones the CLI accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from pipeline.config import PipelineConfig
from pretrain.configtools import load_config

REPO = Path(__file__).resolve().parents[2]


def _check_pipeline_command(command: str) -> PipelineConfig:
    argv = shlex.split(command)
    start = argv.index("pipeline")
    assert argv[start - 2 : start + 2] == ["python", "-m", "pipeline", "run"]
    config, overrides = argv[start + 2], argv[start + 3 :]
    assert (REPO / config).is_file()
    cfg = load_config(PipelineConfig, REPO / config, overrides)  # raises on a misspelt key
    assert cfg.output_dir and cfg.input.urls
    from pipeline import plan

    plan.resolve_plan(cfg)
    return cfg


def _check_full_curation(cfg: PipelineConfig) -> None:
    """The whole recipe, every setting in range, with the inputs a curation needs."""
    from pipeline.config import check_crawl_config, check_embed_config
    from pipeline.stages.cluster import check_cluster_config
    from pipeline.stages.curate import check_curate_config
    from pipeline.stages.semdedup import check_semdedup_config

    assert list(cfg.stages) == ["crawl", "dedup", "embed", "semdedup", "cluster", "curate",
                                "write"]  # fmt: skip
    check_crawl_config(cfg.crawl)
    check_embed_config(cfg.embed)
    check_semdedup_config(cfg.semdedup)
    check_cluster_config(cfg.cluster)
    check_curate_config(cfg.curate)
    assert cfg.embed.checkpoint and cfg.curate.seeds and cfg.curate.target_size > 0


def test_kuberay_rayjob_runs_the_pipeline_cli():
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    _check_full_curation(_check_pipeline_command(job["spec"]["entrypoint"]))
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups["crawlers"]["replicas"] >= 1
    gpu = groups["embedders"]  # the embed stage's actors ask Ray for one GPU each
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"


def test_ray_cluster_launcher_config_and_its_submit_example():
    text = (REPO / "cluster/ray/cluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    for key in ("cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cluster, key
    # Ray's own checks of a launcher file: the defaults `ray up` fills in, then its JSON schema
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))
    example = " ".join(
        line.lstrip("# ").rstrip("\\ ") for line in text.splitlines() if line.startswith("#   ")
    )
    submit = example[example.index("ray job submit") :].split("ray down")[0]
    _check_full_curation(_check_pipeline_command(submit[submit.index("python") :]))
