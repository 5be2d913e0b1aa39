"""Where the pipeline's GPU work runs: what each Ray task or actor asks for, the embed actors'
GPU defaults, and FAISS indexes copied onto GPUs.

The runner (pipeline/runner*.py, the only modules that import Ray) reads the cluster's GPUs
(``ray.cluster_resources()``, ``ray.nodes()``) and asks here, at every ``.options`` site that
embeds or builds / searches a FAISS index, what to request:

- ``search`` (semdedup's kNN query chunks) and ``assign`` (cluster's level-1 assignment, one task
  per embedding part): ``num_gpus = <section>.gpus_per_task`` when ``<section>.use_gpu`` is on
  and the cluster has GPUs (for ``search``, also only when the index can run on a GPU: FAISS
  runs the inverted multi-index on the CPU only); otherwise no GPU, and the task searches the
  CPU index.
- ``embed``: ``embed.actors_per_gpu`` actors per GPU of ``1 / actors_per_gpu`` GPU each, with
  the CPUs of the GPU nodes shared among them for decoding; on a CPU-only cluster one actor of
  half a CPU, as always.

Inside a task FAISS goes to the GPU only when the task was given one (``ray.get_gpu_ids()``:
Ray 2.60 no longer hides the GPUs from a task that asked for none, so "the node has GPUs" is
not "this task may use one") and FAISS sees one (``faiss.get_num_gpus() > 0``: faiss-gpu
imports on a machine without CUDA and then quietly runs on the CPU).

Pure functions, no Ray; FAISS only imported by the functions that move an index.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TASK_KINDS = ("search", "assign", "embed")

# CPU defaults of the embed actors: what the pipeline always ran with (the demo's embeddings,
# and everything after them, are byte-reproducible: these must not move).
CPU_BATCH_SIZE = 64
CPU_DECODE_THREADS = 4
CPU_ACTOR_CPUS = 0.5  # never a whole CPU: on a 2-CPU machine actors would starve the tasks
# On a GPU: 256 images of 224 px per forward (bf16), four times the CPU batch, so that a forward
# outweighs the per-batch host work (stack, copy in, features back); far from the memory of a
# datacenter GPU even for ViT-g. A starting point, not measured here (no GPU on the CI machine).
# Other sizes keep the pixel count (activations grow with it), within these bounds.
GPU_BATCH_AT_224 = 256
GPU_BATCH_MIN, GPU_BATCH_MAX = 8, 1024
# Several GPUs: shard an index from this size on, replicate a smaller one. A replica on every
# GPU answers without merging per-GPU results but holds the whole index on each; from a few GB
# on, the copies would crowd out the search's own working memory on smaller GPUs.
SHARD_MIN_BYTES = 4 << 30
RESOURCE_UNIT = 1e-4  # Ray counts fractional resources in steps of 1e-4


@dataclass(frozen=True)
class Placement:
    """What one kind of task asks Ray for, and whether its work is meant for a GPU."""

    options: dict[str, float]  # for ``.options(**options)``: num_cpus, and num_gpus when gpu
    gpu: bool


@dataclass(frozen=True)
class EmbedPool:
    """The embed actors: how many, what each asks Ray for, and the CPUs each has to decode."""

    actors: int
    options: dict[str, float]
    gpu: bool
    cpus: float  # the actor's CPU share: its decode threads on a GPU (embed.decode_threads=0)


@dataclass(frozen=True)
class GpuCopy:
    """How an index goes onto ``gpus`` GPUs (FAISS's GpuMultipleClonerOptions)."""

    gpus: int
    shard: bool  # split the rows over the GPUs, instead of a whole replica on each
    float16: bool  # flat vectors / IVF-PQ lookup tables in float16


# -- the cluster --------------------------------------------------------------------------------


def cluster_gpus(resources: Mapping[str, float]) -> int:
    """Whole GPUs in ``ray.cluster_resources()``."""
    return int(resources.get("GPU", 0))


def cpus_per_gpu(nodes: Iterable[Mapping[str, Any]]) -> float | None:
    """CPUs per GPU of the alive GPU node that has the fewest (``ray.nodes()``), None without
    GPU nodes: an embed actor sized by it fits beside its GPU on every one of them."""
    ratios = [
        node["Resources"].get("CPU", 0) / node["Resources"]["GPU"]
        for node in nodes
        if node.get("Alive", True) and node.get("Resources", {}).get("GPU", 0) >= 1
    ]
    return min(ratios) if ratios else None


def _units(value: float) -> float:
    """``value`` rounded down to Ray's resource unit: n shares of 1/n never exceed one GPU."""
    return round(math.floor(value / RESOURCE_UNIT + 1e-9) * RESOURCE_UNIT, 4)


def _cpu_share(value: float) -> float:
    """A share of a node's CPUs: whole CPUs from one on (what the decode threads count)."""
    return float(math.floor(value)) if value >= 1 else _units(value)


# -- config checks ------------------------------------------------------------------------------


def check_gpus_per_task(value: float, key: str) -> None:
    """A task's GPUs: a share of one GPU (0, 1], or a whole number of them."""
    if not (0 < value <= 1 or (value > 1 and float(value).is_integer())):  # NaN fails too
        raise ValueError(
            f"{key} must be in (0, 1] (a share of one GPU) or a whole number of GPUs, got {value}"
        )


# -- Ray options per kind -----------------------------------------------------------------------


def _task_placement(use_gpu: bool, gpus_per_task: float, gpus: float, key: str) -> Placement:
    if not (use_gpu and gpus > 0):
        return Placement({"num_cpus": 1}, False)  # Ray's default for a task: as it always ran
    if gpus_per_task > gpus:
        raise ValueError(
            f"{key}={gpus_per_task} asks for more GPUs per task than the cluster's {gpus:g}"
        )
    return Placement({"num_cpus": 1, "num_gpus": _units(gpus_per_task)}, True)


def search_placement(sem: Any, gpus: float, gpu_index: bool = True) -> Placement:
    """semdedup's query-chunk tasks. ``gpu_index``: the index can go to a GPU (not the
    multi-index); a GPU held by a task that searches on the CPU would only idle."""
    return _task_placement(sem.use_gpu and gpu_index, sem.gpus_per_task, gpus,
                           "semdedup.gpus_per_task")  # fmt: skip


def assign_placement(ccfg: Any, gpus: float) -> Placement:
    """cluster's level-1 assignment tasks (one per embedding part)."""
    return _task_placement(ccfg.use_gpu, ccfg.gpus_per_task, gpus, "cluster.gpus_per_task")


def embed_pool(embed: Any, gpus: float, node_cpus_per_gpu: float | None = None) -> EmbedPool:
    """The embed actors on a cluster with ``gpus`` GPUs whose GPU nodes have at least
    ``node_cpus_per_gpu`` CPUs per GPU (``cpus_per_gpu``).

    On GPUs: ``embed.actors`` or ``gpus * embed.actors_per_gpu`` actors of ``1 / actors_per_gpu``
    GPU each (while one decodes, stacks and copies its batch in, the other's forward runs), each
    with ``embed.cpus_per_actor`` CPUs or its share of the node's. Otherwise, exactly as before:
    ``embed.actors`` or one actor, of at most half a CPU (torch still uses the node's cores)."""
    if gpus > 0 and embed.device != "cpu":
        per_gpu = int(embed.actors_per_gpu)
        cpus = embed.cpus_per_actor or _cpu_share((node_cpus_per_gpu or per_gpu) / per_gpu)
        options = {"num_cpus": cpus, "num_gpus": _units(1 / per_gpu)}
        return EmbedPool(embed.actors or int(gpus) * per_gpu, options, True, cpus)
    cpus = min(embed.cpus_per_actor or CPU_ACTOR_CPUS, CPU_ACTOR_CPUS)
    return EmbedPool(embed.actors or 1, {"num_cpus": cpus}, False, cpus)


def placement(cfg: Any, kind: str, gpus: float, **kwargs: Any) -> Placement:
    """The Ray options of one ``kind`` of task or actor (TASK_KINDS) of a pipeline config on a
    cluster with ``gpus`` GPUs. kwargs: ``gpu_index`` (search), ``node_cpus_per_gpu`` (embed)."""
    if kind == "search":
        return search_placement(cfg.semdedup, gpus, **kwargs)
    if kind == "assign":
        return assign_placement(cfg.cluster, gpus)
    if kind == "embed":
        pool = embed_pool(cfg.embed, gpus, **kwargs)
        return Placement(pool.options, pool.gpu)
    raise ValueError(f"unknown task kind {kind!r}; kinds are {TASK_KINDS}")


# -- the embed actors' batch and decode threads -------------------------------------------------


def gpu_batch_size(image_size: int) -> int:
    """GPU_BATCH_AT_224 images at 224 px, the same pixels per batch at other sizes (a multiple
    of 8, within GPU_BATCH_MIN..GPU_BATCH_MAX)."""
    batch = int(GPU_BATCH_AT_224 * (224 / image_size) ** 2) // 8 * 8
    return max(GPU_BATCH_MIN, min(GPU_BATCH_MAX, batch))


def _process_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_embed(embed: Any, gpu: bool, cpus: float | None = None) -> Any:
    """``embed`` (an EmbedConfig) with ``batch_size`` and ``decode_threads`` of 0 (auto) set for
    where the model runs. CPU: CPU_BATCH_SIZE and CPU_DECODE_THREADS. GPU: ``gpu_batch_size``
    and a decode thread per CPU of the actor (``cpus``; the process's CPUs when not given), at
    least CPU_DECODE_THREADS: decoding is what keeps a GPU fed, and Pillow releases the GIL."""
    if gpu:
        cpus = _process_cpus() if cpus is None else cpus
        batch, threads = gpu_batch_size(embed.image_size), max(CPU_DECODE_THREADS, int(cpus))
    else:
        batch, threads = CPU_BATCH_SIZE, CPU_DECODE_THREADS
    return dataclasses.replace(
        embed, batch_size=embed.batch_size or batch, decode_threads=embed.decode_threads or threads
    )


# -- FAISS indexes on GPUs ----------------------------------------------------------------------


def gpu_copy(gpus: int, index_bytes: int, float16: bool = False) -> GpuCopy:
    """How an index of about ``index_bytes`` goes onto ``gpus`` GPUs: sharded when there are
    several and it is big (SHARD_MIN_BYTES), float16 when the config asks."""
    return GpuCopy(gpus, shard=gpus > 1 and index_bytes >= SHARD_MIN_BYTES, float16=float16)


def cloner_options(copy: GpuCopy, options_cls: Any) -> Any:
    """A FAISS ``GpuMultipleClonerOptions`` (``options_cls``: faiss-gpu's class, or a stand-in
    with the same fields in tests) set for ``copy``."""
    options = options_cls()
    options.shard = copy.shard
    options.useFloat16 = copy.float16
    return options


def index_to_gpus(index: Any, index_bytes: int, float16: bool = False) -> Any:
    """``index`` (a CPU index) on every GPU this process sees, through FAISS's cloner (sharded
    or replicated: ``gpu_copy``); ``index`` itself when FAISS sees none.

    A flat index must hold its rows before it is sharded: FAISS's flat shards take one ``add``
    only. An IVF index must be trained before it is sharded or replicated, so that every copy
    shares one coarse quantizer (separately trained shards would merge back wrong)."""
    import faiss

    gpus = faiss.get_num_gpus()
    if gpus == 0:
        return index
    options = cloner_options(gpu_copy(gpus, index_bytes, float16), faiss.GpuMultipleClonerOptions)
    return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=gpus)
