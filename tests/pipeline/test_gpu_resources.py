"""What the pipeline's GPU work asks Ray for, and how FAISS indexes go onto GPUs, on a CPU
machine: pipeline/resources.py's options per task kind, the embed pool's sizing and batch
defaults, the FAISS cloner options (through stand-ins of faiss-gpu's classes), the config
checks, and one run on a local Ray cluster with a fake GPU: the search, assignment and embed
work is given the GPU while FAISS, seeing none, stays on the CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from pipeline import resources as res
from pipeline.config import (
    ClusterConfig,
    CurateConfig,
    EmbedConfig,
    PipelineConfig,
    SemDedupConfig,
    check_embed_config,
)
from pipeline.stages import cluster as cl
from pipeline.stages import semdedup as sd
from pretrain.configtools import ConfigError, load_config

from .conftest import _free_port, _stop_group, agent_port_flags, wait_for

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
FIXTURE = REPO / "tests" / "fixtures" / "vit_test_embedder.safetensors"
# On a machine where FAISS sees a real GPU the "stays on the CPU" checks do not apply.
FAISS_GPU = faiss.get_num_gpus() > 0


def pipeline_cfg(**sections) -> PipelineConfig:
    return PipelineConfig(output_dir="unused", **sections)


def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- Ray options per kind ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", res.TASK_KINDS)
def test_every_kind_asks_for_gpus_when_the_cluster_has_them_and_the_config_allows(kind):
    on_gpu = res.placement(pipeline_cfg(), kind, gpus=4)
    assert on_gpu.gpu and on_gpu.options["num_gpus"] > 0
    no_gpus = res.placement(pipeline_cfg(), kind, gpus=0)
    assert not no_gpus.gpu and "num_gpus" not in no_gpus.options


@pytest.mark.parametrize(
    "kind, disabled",
    [("search", {"semdedup": SemDedupConfig(use_gpu=False)}),
     ("assign", {"cluster": ClusterConfig(use_gpu=False)}),
     ("embed", {"embed": EmbedConfig(device="cpu")})],
)  # fmt: skip
def test_a_section_with_gpus_off_asks_for_none_on_a_gpu_cluster(kind, disabled):
    place = res.placement(pipeline_cfg(**disabled), kind, gpus=4)
    assert not place.gpu and "num_gpus" not in place.options


def test_task_requests_follow_the_sections_gpus_per_task():
    cfg = pipeline_cfg(semdedup=SemDedupConfig(gpus_per_task=0.5),
                       cluster=ClusterConfig(gpus_per_task=2))  # fmt: skip
    assert res.placement(cfg, "search", 4).options == {"num_cpus": 1, "num_gpus": 0.5}
    assert res.placement(cfg, "assign", 4).options == {"num_cpus": 1, "num_gpus": 2}
    # defaults: a whole GPU per search task (the pool's index), a quarter per assignment task
    assert res.placement(pipeline_cfg(), "search", 1).options["num_gpus"] == 1
    assert res.placement(pipeline_cfg(), "assign", 1).options["num_gpus"] == 0.25
    # on a CPU cluster: Ray's default for a task, exactly what the pipeline always asked
    assert res.placement(pipeline_cfg(), "search", 0).options == {"num_cpus": 1}


def test_search_over_a_cpu_only_index_asks_for_no_gpu():
    """The inverted multi-index runs on the CPU only: a GPU held by its task would idle."""
    place = res.placement(pipeline_cfg(), "search", 4, gpu_index=False)
    assert not place.gpu and "num_gpus" not in place.options
    pool = unit(np.random.default_rng(0).standard_normal((3000, 16)))
    imi = sd.build_index([pool], SemDedupConfig(index="imi", use_gpu=False), len(pool))
    flat = sd.build_index([pool], SemDedupConfig(index="flat", use_gpu=False), len(pool))
    assert sd.cpu_only(imi) and not sd.cpu_only(flat)


def test_more_gpus_per_task_than_the_cluster_has_is_a_clear_error():
    cfg = pipeline_cfg(semdedup=SemDedupConfig(gpus_per_task=4))
    with pytest.raises(ValueError, match=r"semdedup.gpus_per_task=4 .*cluster's 2"):
        res.placement(cfg, "search", 2)
    with pytest.raises(ValueError, match="unknown task kind 'crawl'"):
        res.placement(pipeline_cfg(), "crawl", 2)


# -- the embed pool ---------------------------------------------------------------------------


def test_embed_pool_on_gpus_runs_actors_per_gpu_with_a_share_of_the_cpus():
    embed = EmbedConfig(checkpoint="x")
    pool = res.embed_pool(embed, gpus=4, node_cpus_per_gpu=24)
    assert pool.gpu and pool.actors == 4 * embed.actors_per_gpu == 8
    assert pool.options == {"num_cpus": 12, "num_gpus": 0.5} and pool.cpus == 12
    three = res.embed_pool(dataclasses.replace(embed, actors_per_gpu=3), 2, 8)
    assert three.actors == 6 and three.options["num_gpus"] == 0.3333
    assert 3 * three.options["num_gpus"] <= 1 and three.options["num_cpus"] == 2
    one = res.embed_pool(dataclasses.replace(embed, actors_per_gpu=1, actors=3), 4, 6)
    assert one.actors == 3 and one.options == {"num_cpus": 6, "num_gpus": 1}
    fixed = res.embed_pool(dataclasses.replace(embed, cpus_per_actor=3.0), 1, 24)
    assert fixed.options["num_cpus"] == 3.0
    few = res.embed_pool(embed, 1, 1)  # one CPU per GPU: half each, never more than there is
    assert few.options["num_cpus"] == 0.5


def test_embed_pool_on_a_cpu_cluster_is_as_before():
    """One actor of half a CPU (fewer when asked, never more), whatever cpus_per_actor says
    above that; embed.actors when set; device=cpu on a GPU cluster likewise."""
    embed = EmbedConfig(checkpoint="x")
    assert res.embed_pool(embed, 0) == res.EmbedPool(1, {"num_cpus": 0.5}, False, 0.5)
    assert res.embed_pool(dataclasses.replace(embed, cpus_per_actor=1.0), 0).options == {
        "num_cpus": 0.5}  # fmt: skip
    assert res.embed_pool(dataclasses.replace(embed, cpus_per_actor=0.25, actors=2), 0) == (
        res.EmbedPool(2, {"num_cpus": 0.25}, False, 0.25))  # fmt: skip
    assert not res.embed_pool(dataclasses.replace(embed, device="cpu"), 8, 24).gpu


def test_cpus_per_gpu_reads_the_poorest_alive_gpu_node():
    nodes = [{"Alive": True, "Resources": {"CPU": 64.0}},  # a crawler: no GPU
             {"Alive": True, "Resources": {"CPU": 96.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}},
             {"Alive": False, "Resources": {"CPU": 2.0, "GPU": 2.0}}]  # fmt: skip
    assert res.cpus_per_gpu(nodes) == 8
    assert res.cpus_per_gpu(nodes[:1]) is None
    assert res.cluster_gpus({"CPU": 8.0, "GPU": 2.0}) == 2 and res.cluster_gpus({"CPU": 2}) == 0


def test_embed_defaults_keep_the_cpu_values_and_feed_a_gpu():
    embed = EmbedConfig(checkpoint="x")  # batch_size = decode_threads = 0: auto
    cpu = res.resolve_embed(embed, gpu=False, cpus=16)
    assert (cpu.batch_size, cpu.decode_threads) == (64, 4)  # as the pipeline always ran
    gpu = res.resolve_embed(embed, gpu=True, cpus=12)
    assert (gpu.batch_size, gpu.decode_threads) == (256, 12)
    assert res.resolve_embed(embed, gpu=True, cpus=2).decode_threads == 4
    big = res.resolve_embed(dataclasses.replace(embed, image_size=448), gpu=True, cpus=8)
    assert big.batch_size == 64
    assert res.gpu_batch_size(56) == res.GPU_BATCH_MAX and res.gpu_batch_size(4000) == 8
    mine = dataclasses.replace(embed, batch_size=32, decode_threads=2)
    assert res.resolve_embed(mine, gpu=True, cpus=12) == mine


def test_the_embedder_on_a_cpu_resolves_the_cpu_defaults():
    from pipeline.stages.embed import Embedder

    embedder = Embedder(EmbedConfig(checkpoint=str(FIXTURE), image_size=56, device="cpu"))
    assert embedder.device.type == "cpu"
    assert (embedder.cfg.batch_size, embedder.cfg.decode_threads) == (64, 4)


# -- FAISS on GPUs ----------------------------------------------------------------------------


class FakeClonerOptions:
    """faiss-gpu's GpuMultipleClonerOptions, as far as the pipeline touches it."""

    def __init__(self) -> None:
        self.shard = False
        self.useFloat16 = False


def test_cloner_options_shard_big_indexes_over_several_gpus_and_take_float16_from_the_config():
    big, small = res.SHARD_MIN_BYTES, res.SHARD_MIN_BYTES - 1
    assert res.gpu_copy(4, big) == res.GpuCopy(4, shard=True, float16=False)
    assert not res.gpu_copy(4, small).shard  # a small one: a replica on each GPU
    assert not res.gpu_copy(1, 10 * big).shard  # one GPU: nothing to shard over
    options = res.cloner_options(res.gpu_copy(2, big, float16=True), FakeClonerOptions)
    assert options.shard is True and options.useFloat16 is True
    options = res.cloner_options(res.gpu_copy(2, small), FakeClonerOptions)
    assert options.shard is False and options.useFloat16 is False


@pytest.mark.skipif(FAISS_GPU, reason="FAISS sees a GPU here")
def test_without_a_gpu_faiss_indexes_stay_on_the_cpu():
    """faiss.get_num_gpus() == 0 here: asking for GPUs changes nothing (the guard that keeps
    faiss-gpu on a CPU machine from handing back an empty index)."""
    index = faiss.IndexFlatIP(8)
    assert res.index_to_gpus(index, 1 << 40, float16=True) is index
    pool = unit(np.random.default_rng(1).standard_normal((500, 8)))
    built = sd.build_index([pool], SemDedupConfig(index="flat", use_gpu=True), len(pool))
    assert not sd.on_gpu(built) and built.ntotal == 500
    assert type(cl.centroid_index(pool[:5], use_gpu=True)).__name__ == "IndexFlatIP"


@pytest.fixture
def fake_gpus(monkeypatch):
    """FAISS that reports 2 GPUs and records every copy to them (the copy is the CPU index
    itself, so the code after it still runs): (call, ngpu, options, ntotal, is_trained)."""
    calls = []

    def to_gpus(index, co=None, ngpu=-1):
        calls.append((ngpu, co, index.ntotal, index.is_trained))
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index, raising=False)
    return calls


def test_an_ivf_index_is_trained_once_then_sharded_empty(fake_gpus, monkeypatch):
    """IVF: trained on one GPU, then the trained, empty index goes to both GPUs (sharded: big
    enough here; float16 as asked), then it is filled: every shard shares one quantizer."""
    monkeypatch.setattr(res, "SHARD_MIN_BYTES", 1)
    pool = unit(np.random.default_rng(2).standard_normal((4000, 16)))
    cfg = SemDedupConfig(index="ivf", ivf_nlist=16, use_gpu=True, gpu_float16=True)
    index = sd.build_index([pool], cfg, len(pool))
    (train_ngpu, train_co, _, trained_then), (ngpu, co, ntotal, trained) = fake_gpus
    assert train_ngpu == 1 and train_co is None and not trained_then
    assert ngpu == 2 and co.shard and co.useFloat16 and ntotal == 0 and trained
    assert index.ntotal == 4000


def test_a_flat_index_is_filled_before_it_goes_to_the_gpus(fake_gpus):
    """FAISS's flat shards take a single add: the copy gets the filled index. Small: replicas."""
    pool = unit(np.random.default_rng(3).standard_normal((300, 16)))
    sd.build_index([pool], SemDedupConfig(index="flat", use_gpu=True), len(pool))
    ((ngpu, co, ntotal, _),) = fake_gpus
    assert ngpu == 2 and ntotal == 300 and not co.shard and not co.useFloat16
    cl.centroid_index(pool[:7], use_gpu=True, float16=True)
    assert fake_gpus[-1][2] == 7 and fake_gpus[-1][1].useFloat16


def test_a_shipped_index_goes_to_the_tasks_gpus_unless_it_is_cpu_only(fake_gpus, monkeypatch):
    monkeypatch.setattr(res, "SHARD_MIN_BYTES", 1)
    pool = unit(np.random.default_rng(4).standard_normal((3000, 16)))
    cpu = SemDedupConfig(use_gpu=False)
    flat = sd.serialize_index(sd.build_index([pool], dataclasses.replace(cpu, index="flat"), 3000))
    imi = sd.serialize_index(sd.build_index([pool], dataclasses.replace(cpu, index="imi"), 3000))
    assert not fake_gpus
    sd.deserialize_index(flat)  # not asked: stays
    sd.deserialize_index(imi, use_gpu=True)  # the multi-index runs on the CPU only
    assert not fake_gpus
    sd.deserialize_index(flat, use_gpu=True, float16=True)
    ((ngpu, co, ntotal, _),) = fake_gpus
    assert ngpu == 2 and co.shard and co.useFloat16 and ntotal == 3000


def test_sharded_indexes_count_as_gpu_indexes():
    """An IndexShards from the cloner is a GPU index: kNN capped at GPU_MAX_K, no range search."""
    shards = faiss.IndexShards(8)
    assert sd.on_gpu(shards) and sd.on_gpu(faiss.IndexReplicas(8))
    assert not sd.on_gpu(faiss.IndexFlatIP(8))


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [({"actors_per_gpu": 0}, "embed.actors_per_gpu"), ({"batch_size": -1}, "embed.batch_size"),
     ({"decode_threads": -2}, "embed.decode_threads"),
     ({"cpus_per_actor": -0.5}, "embed.cpus_per_actor"), ({"actors": -1}, "embed.actors"),
     ({"cpus_per_actor": float("nan")}, "embed.cpus_per_actor")],
)  # fmt: skip
def test_bad_embed_settings_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_embed_config(EmbedConfig(checkpoint="x", **override))
    check_embed_config(EmbedConfig(checkpoint="x"))  # the defaults (0: auto) pass


@pytest.mark.parametrize("value", [0, -1, 1.5, float("nan")])
def test_bad_gpus_per_task_names_the_key(value):
    with pytest.raises(ValueError, match=r"semdedup\.gpus_per_task must be in \(0, 1\]"):
        sd.check_semdedup_config(SemDedupConfig(gpus_per_task=value))
    with pytest.raises(ValueError, match=r"cluster\.gpus_per_task must be in \(0, 1\]"):
        cl.check_cluster_config(ClusterConfig(gpus_per_task=value))


def test_whole_and_fractional_gpus_per_task_pass():
    for value in (0.1, 0.25, 1, 2, 8.0):
        sd.check_semdedup_config(SemDedupConfig(gpus_per_task=value))
        cl.check_cluster_config(ClusterConfig(gpus_per_task=value))


def test_the_gpu_knobs_are_strict_config_keys():
    cfg = load_config(PipelineConfig, None, ["output_dir=x", "embed.actors_per_gpu=4",
                                             "semdedup.gpu_float16=true", "curate.use_gpu=false",
                                             "cluster.gpus_per_task=0.5"])  # fmt: skip
    assert cfg.embed.actors_per_gpu == 4 and cfg.semdedup.gpu_float16
    assert not cfg.curate.use_gpu and cfg.cluster.gpus_per_task == 0.5
    with pytest.raises(ConfigError):
        load_config(PipelineConfig, None, ["output_dir=x", "embed.actors_per_gpu=1.5"])
    with pytest.raises(ConfigError):
        load_config(PipelineConfig, None, ["output_dir=x", "embed.actor_per_gpu=2"])
    assert CurateConfig().use_gpu and not CurateConfig().gpu_float16


# -- a Ray cluster with a fake GPU ------------------------------------------------------------

DRIVER = r"""
import json, sys
from pathlib import Path

import numpy as np
import ray

from pipeline import runner, runner_curate as rc
from pipeline.config import ClusterConfig, PipelineConfig, SemDedupConfig
from pipeline.stages import cluster as cl, semdedup as sd
from pipeline.stages.curate import RowSubset
from pretrain.configtools import load_config

address, tmp, checkpoint = sys.argv[1:4]
ray.init(address=address, log_to_driver=False)
out = {"cluster_gpus": runner.cluster_gpus()}
rng = np.random.default_rng(0)
x = rng.standard_normal((240, 16)).astype(np.float32)
x[1::2] = x[::2] + 0.05 * rng.standard_normal((120, 16))  # planted near copies: edges to find
x /= np.linalg.norm(x, axis=1, keepdims=True)
paths = []
for i, (a, b) in enumerate([(0, 120), (120, 240)]):
    paths.append(Path(tmp) / f"{i}.npy")
    np.save(paths[-1], x[a:b].astype(np.float16))
parts = [np.load(p, mmap_mode="r") for p in paths]
for use_gpu in (True, False):
    sem = SemDedupConfig(k=8, threshold=0.9, query_chunk=50, use_gpu=use_gpu)
    index = sd.build_index(parts, sem, 240)
    search = runner.RaySearch(sem, paths, out["cluster_gpus"])
    edges = search(index, parts, sem.k, sem.threshold)
    expected = sd.search_all(index, parts, sem.k, sem.threshold, sem.query_chunk)
    out[f"search_{use_gpu}"] = {
        "same": all(np.array_equal(a, b) for a, b in zip(edges, expected)),
        "edges": int(len(edges[0])), "placements": search.placements}
centroids = np.ascontiguousarray(x[:6])
rows = [np.arange(120), np.arange(0, 120, 2)]
for use_gpu in (True, False):
    ccfg = ClusterConfig(levels=[6], resampling_steps=[0], sample_sizes=[0], use_gpu=use_gpu)
    labels, _, places = rc.assign_pool(centroids, paths, rows, ccfg, out["cluster_gpus"])
    local = [RowSubset(p, r) for p, r in zip(parts, rows)]
    out[f"assign_{use_gpu}"] = {
        "same": bool(np.array_equal(labels, cl.assign_parts(centroids, local, 64)[0])),
        "placements": places}
cfg = load_config(PipelineConfig, None, [f"output_dir={tmp}", f"embed.checkpoint={checkpoint}",
                                         "embed.image_size=56"])
actors = runner.embed_actors(cfg)
out["embed"] = ray.get([actor.placement.remote() for actor in actors])
for actor in actors:
    ray.kill(actor)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fake_gpu_run(tmp_path_factory):
    """A Ray head of 2 CPUs and 1 (fake) GPU on 127.0.0.1, in its own process group, and one
    driver over it (a separate process: the suite's own cluster has no GPU, and one process
    joins one cluster): its report of the search, assignment and embed work."""
    temp = tmp_path_factory.mktemp("raygpu")
    port = _free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--num-gpus=1", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}", f"--ray-client-server-port={_free_port()}", *agent_port_flags()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    probe = "import ray, sys; ray.init(address=sys.argv[1]); print(ray.cluster_resources())"
    try:
        up = wait_for(lambda: head.poll() is None and subprocess.run(
            [sys.executable, "-c", probe, address], capture_output=True, env=env, timeout=60
        ).returncode == 0, timeout_s=120, every_s=1.0)  # fmt: skip
        assert up, "the Ray head with a fake GPU did not come up"
        driver = temp / "driver.py"
        driver.write_text(DRIVER)
        result = subprocess.run(
            [sys.executable, str(driver), address, str(temp), str(FIXTURE)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        yield json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        _stop_group(head)


def test_search_tasks_hold_the_gpu_while_faiss_searches_on_the_cpu(fake_gpu_run):
    assert fake_gpu_run["cluster_gpus"] == 1
    run = fake_gpu_run["search_True"]
    assert run["same"] and run["edges"] > 0
    assert len(run["placements"]) == 6  # 2 parts of 120 rows, chunks of 50: 3 tasks each
    assert all(p["gpu_ids"] for p in run["placements"])  # the request was made and granted
    assert all(p["faiss_gpu"] == FAISS_GPU for p in run["placements"])  # faiss-cpu: none


def test_search_tasks_without_use_gpu_hold_none(fake_gpu_run):
    run = fake_gpu_run["search_False"]
    assert run["same"] and len(run["placements"]) == 6
    assert not any(p["gpu_ids"] for p in run["placements"])


def test_assignment_tasks_hold_the_gpu_share_unless_disabled(fake_gpu_run):
    on, off = fake_gpu_run["assign_True"], fake_gpu_run["assign_False"]
    assert on["same"] and off["same"]
    assert len(on["placements"]) == 2 and all(p["gpu_ids"] for p in on["placements"])
    assert all(p["faiss_gpu"] == FAISS_GPU for p in on["placements"])
    assert not any(p["gpu_ids"] for p in off["placements"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a real GPU here")
def test_embed_actors_share_the_gpu(fake_gpu_run):
    """actors_per_gpu (2) actors on the one GPU, each given it; torch finds no CUDA, so each
    embeds on the CPU with the CPU defaults."""
    actors = fake_gpu_run["embed"]
    assert len(actors) == EmbedConfig().actors_per_gpu == 2
    assert all(a["gpu_ids"] == ["0"] for a in actors)
    assert all(a["device"] == "cpu" and (a["batch_size"], a["decode_threads"]) == (64, 4)
               for a in actors)  # fmt: skip
