"""Runs the planned stages on Ray, in order; the only module of the pipeline that imports Ray.

- crawl: one Ray task per input shard, a bounded number in flight; a shard is done once its
  stats file is in place, and a rerun redoes unfinished shards from scratch.
- dedup: on the driver, over the crawl manifests (reads only parquet columns).
- embed: a pool of actors (`ray.util.ActorPool`), each loading the backbone once
  (`embed.actors_per_gpu` per GPU when the cluster has GPUs, fractional CPUs otherwise); one
  crawl shard per call, its done marker carrying a token of its inputs, so a rerun skips
  exactly the shards still valid.
- semdedup: embeddings memory-mapped on the driver, FAISS index built once, query chunks spread
  over Ray tasks (the index shipped through the object store; each task holding
  `semdedup.gpus_per_task` GPUs when the cluster has them) when the pool spans several chunks;
  evaluation sets embedded by the same actors.

What each task or actor asks Ray for comes from pipeline/resources.py.

Killing the driver at any moment loses nothing finished: every file is written then renamed,
done markers last.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray.util import ActorPool

from pipeline import plan
from pipeline import resources as res
from pipeline.config import CrawlConfig, EmbedConfig, PipelineConfig
from pipeline.layout import RunLayout, clear_temporaries, shard_of_key, token
from pipeline.shardio import read_stats, write_stats, write_train_shard_list
from pipeline.sources import input_digest, iter_shards
from pipeline.stages.crawl import crawl_shard_steps, to_retry
from pipeline.stages.dedup import run_dedup
from pretrain.configtools import ConfigError, to_object

log = logging.getLogger(__name__)


@ray.remote(max_retries=2)
def _crawl_task(table, shard_index: int, crawl_dir: str, crawl: CrawlConfig, kind: str):
    """A Ray generator task: yields TAIL when its last row is in flight, then its stats (with
    the node that ran it)."""
    logging.basicConfig(level=logging.INFO)
    node = ray.get_runtime_context().get_node_id()
    for report in crawl_shard_steps(table, shard_index, Path(crawl_dir), crawl, kind):
        yield report if report.get("tail") else {**report, "node_id": node}


def connect(cfg: PipelineConfig, address: str | None) -> None:
    """Join an existing cluster (argument, config, RAY_ADDRESS) or start a local one."""
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=cfg.ray.num_cpus or None,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )


def run_pipeline(cfg: PipelineConfig, total_rows: int, address: str | None = None) -> dict:
    """Run every planned stage in order; stop at the first that leaves work unfinished."""
    layout = RunLayout(cfg.output_dir)
    stages = plan.check_plan(cfg, layout)
    removed = plan.apply_redo(cfg, layout)
    if removed:
        log.info("redo: cleared the outputs of %s", ", ".join(removed))
    from pipeline import runner_curate as rc

    runners = {"crawl": _run_crawl, "dedup": _run_dedup, "embed": _run_embed,
               "semdedup": _run_semdedup, "cluster": rc.run_cluster, "curate": rc.run_curate,
               "write": rc.run_write}  # fmt: skip
    summary: dict[str, Any] = {"stages": stages, "ok": True}
    connect(cfg, address)
    try:
        for stage in stages:
            started = time.time()
            previous = plan.read_state(layout, stage)
            plan.mark(layout, cfg, stage, "running")
            result = runners[stage](cfg, layout, total_rows, previous)
            result["duration_s"] = round(time.time() - started, 2)
            summary[stage] = result
            if result.get("unfinished"):
                log.error("stage %s left work unfinished: rerun the same command", stage)
                summary["ok"] = False
                break
            input_token = result.pop("input_token", None)
            kept = (previous or {}).get("summary") if result.get("skipped") else None
            plan.mark(layout, cfg, stage, "done", summary=kept or result, input_token=input_token)
    finally:
        ray.shutdown()
    return summary


class Progress:
    """Aggregates finished crawl shards' stats; logs URLs/s, success rate, failures by reason."""

    def __init__(self, total_rows: int) -> None:
        self.total_rows = total_rows
        self.started = time.time()
        self.rows = self.successes = self.shards = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.failed_shards: list[int] = []
        self.shards_per_node: collections.Counter[str] = collections.Counter()

    def add(self, stats: dict) -> None:
        self.shards += 1
        self.shards_per_node[stats.get("node_id", "?")] += 1
        self.rows += stats["count"]
        self.successes += stats["successes"]
        self.errors.update(stats["errors"])
        elapsed = max(time.time() - self.started, 1e-9)
        top = ", ".join(f"{k}={v}" for k, v in self.errors.most_common(5)) or "none"
        log.info(
            "shard %05d done on node %s: %d/%d rows, %.1f URLs/s, success %.1f%%, failures: %s",
            stats["shard"], stats.get("node_id", "?")[:8], self.rows, self.total_rows,
            self.rows / elapsed,
            100.0 * self.successes / max(self.rows, 1), top,
        )  # fmt: skip


def _run_crawl(cfg: PipelineConfig, layout: RunLayout, total_rows: int, previous) -> dict:
    """Crawl every input shard not yet done.

    A shard's task ends only when its slowest row does (a server that takes the whole timeout,
    a retry's backoff), and for that stretch its CPU idles. So a task stops counting against the
    cluster's cores once it reports its tail (every row handed to a thread) and the next shard
    starts beside it. Ray reserves half of ``ray.cpus_per_task`` for each task, so that a
    running shard and one in its tail fit on the same reservation; the driver keeps at most
    CPUs / cpus_per_task shards out of their tails at once, and ``ray.max_tasks_in_flight``
    shards in all.
    """
    layout.crawl_dir.mkdir(parents=True, exist_ok=True)
    clear_temporaries(layout.crawl_dir)
    crawl = to_object(cfg.crawl)
    cpus = ray.cluster_resources().get("CPU", 1)
    running_limit = max(1, int(cpus / cfg.ray.cpus_per_task))
    in_flight_limit = cfg.ray.max_tasks_in_flight or max(2, 2 * int(cpus))
    progress = Progress(total_rows)
    tasks = _CrawlTasks(progress)
    skipped = 0
    for index, table in iter_shards(cfg.input, crawl.shard_size):
        shard = layout.crawl_shard(index)
        done = read_stats(shard.stats) if shard.stats.exists() else None
        crawled_from = (done or {}).get("input_urls_sha256")  # absent: a run of before it
        if crawled_from is not None and crawled_from != input_digest(table):
            raise ConfigError(
                f"{layout.root}: crawl shard {index:05d} was crawled from other URLs than the "
                "input now gives (the input changed since): use a new output_dir, or "
                "redo=[crawl] to crawl it all again"
            )
        if done is not None and not (crawl.retry_failed and to_retry(shard, done)):
            skipped += 1
            continue
        while len(tasks.running) >= running_limit or len(tasks.pending) >= in_flight_limit:
            tasks.wait_one()
        # SPREAD, not Ray's default: the default prefers the node that holds a task's
        # arguments (here the driver's, which put every shard's table), and with half-CPU
        # reservations it would pack twice its cores' worth of running shards there while other
        # nodes idle.
        task = _crawl_task.options(num_cpus=cfg.ray.cpus_per_task / 2, scheduling_strategy="SPREAD")
        tasks.add(task.remote(table, index, str(layout.crawl_dir), crawl, cfg.input.kind), index)
    while tasks.pending:
        tasks.wait_one()
    log.info("crawl finished: %d shards crawled, %d already done", progress.shards, skipped)
    write_train_shard_list(layout, [s.tar for s in layout.crawl_done()])
    return {
        "crawled_shards": progress.shards,
        "skipped_shards": skipped,
        "failed_shards": progress.failed_shards,
        "shards_per_node": dict(progress.shards_per_node),
        "unfinished": bool(progress.failed_shards),
    }


class _CrawlTasks:
    """The crawl tasks in flight (Ray generators), and which of them are not yet in their tail."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.pending: dict[ray.ObjectRefGenerator, int] = {}
        self.running: set[ray.ObjectRefGenerator] = set()

    def add(self, task: ray.ObjectRefGenerator, index: int) -> None:
        self.pending[task] = index
        self.running.add(task)

    def wait_one(self) -> None:
        """Take the next report of one task: its tail, or its end. A task that failed even after
        Ray's retries is logged and left without a stats file, so the next run redoes it."""
        ready, _ = ray.wait(list(self.pending), num_returns=1)
        task = ready[0]
        index = self.pending[task]
        try:
            report = ray.get(next(task))
        except StopIteration:  # ended without stats: cannot happen short of a bug
            report = None
        except ray.exceptions.RayError as exc:
            log.error("shard %05d failed, rerun to redo it: %s", index, exc)
            self.progress.failed_shards.append(index)
            self._drop(task)
            return
        if report is not None and report.get("tail"):
            self.running.discard(task)  # its last rows are in flight: start the next shard
            return
        self._drop(task)
        if report is None:
            log.error("shard %05d ended without its stats, rerun to redo it", index)
            self.progress.failed_shards.append(index)
        else:
            self.progress.add(report)

    def _drop(self, task: ray.ObjectRefGenerator) -> None:
        del self.pending[task]
        self.running.discard(task)


def _run_dedup(cfg: PipelineConfig, layout: RunLayout, total_rows: int, previous) -> dict:
    input_token = _crawl_token(layout)
    if plan.is_done(previous, input_token) and layout.dedup_parquet.exists():
        log.info("dedup: up to date with the crawl, skipped")
        return {"skipped": True, "input_token": input_token}
    result = run_dedup(layout, cfg.dedup.phash_threshold)
    log.info("dedup: %s", result)
    return {**result, "input_token": input_token}


def _crawl_token(layout: RunLayout) -> str:
    return token([(s.index, s.stats.read_text()) for s in layout.crawl_done()])


# -- where tasks run (their requests: pipeline/resources.py) --------------------------------


def cluster_gpus() -> int:
    """The cluster's GPUs, as Ray counts them (what GPU requests can be granted from)."""
    return res.cluster_gpus(ray.cluster_resources())


def where() -> dict:
    """What this task or actor was given: its node and GPU ids (``ray.get_gpu_ids()``)."""
    return {"node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}  # fmt: skip


def log_placement(stage: str, places: list[dict]) -> None:
    """One line per stage: how many of its tasks held a GPU and how many ran FAISS on one."""
    if places:
        with_gpu = sum(bool(p["gpu_ids"]) for p in places)
        on_gpu = sum(bool(p.get("faiss_gpu")) for p in places)
        log.info("%s: %d tasks, %d holding a GPU, %d running FAISS on a GPU", stage,
                 len(places), with_gpu, on_gpu)  # fmt: skip


# -- embed ------------------------------------------------------------------------------------


@ray.remote
class EmbedActor:
    """Loads the backbone once; embeds one crawl shard (or evaluation set) per call."""

    def __init__(self, embed: EmbedConfig, cpus: float | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        import torch

        from pipeline.stages.embed import Embedder

        # batch size and decode threads (0: auto) follow the device the model lands on, and on
        # a GPU the CPUs the pool reserved for this actor
        self.embedder = Embedder(embed, cpus=cpus)
        if embed.torch_threads:
            torch.set_num_threads(embed.torch_threads)
        elif self.embedder.device.type == "cpu":
            # Ray pins OMP_NUM_THREADS to an actor's (fractional) CPU share, which would leave a
            # CPU actor one thread; on a CPU node the actor is the stage's compute: use the node.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, embed.actors or 1)))

    def describe(self) -> dict:
        loaded = self.embedder.loaded
        return {"name": loaded.name, "source": str(loaded.source), "sha256": loaded.sha256,
                "dim": self.embedder.dim, "device": str(self.embedder.device)}  # fmt: skip

    def placement(self) -> dict:
        """Where this actor runs and with what (not part of any output: the stage's summary
        keeps ``describe`` only)."""
        cfg = self.embedder.cfg
        return {**where(), "device": str(self.embedder.device), "batch_size": cfg.batch_size,
                "decode_threads": cfg.decode_threads}  # fmt: skip

    def embed_shard(self, shard, drop: set[str], part, token_: str) -> dict:
        from pipeline.stages.embed import embed_crawl_shard

        return embed_crawl_shard(self.embedder, shard, drop, part, token_)

    def embed_eval_set(self, spec: str, part, token_: str) -> dict:
        from pipeline.stages.embed import embed_eval_set

        return embed_eval_set(self.embedder, spec, part, token_)


def on_embedders(cfg: PipelineConfig, method: str, jobs: list):
    """Run ``EmbedActor.<method>(*job)`` for every job on a fresh actor pool; yield
    (result, the backbone's description) as they finish. No actor starts without jobs."""
    if not jobs:
        return
    actors = embed_actors(cfg)
    described = ray.get(actors[0].describe.remote())
    for result in ActorPool(actors).map_unordered(
        lambda actor, job: getattr(actor, method).remote(*job), jobs
    ):
        yield result, described


def embed_actors(cfg: PipelineConfig) -> list:
    """The actor pool (``resources.embed_pool``): ``embed.actors_per_gpu`` per GPU, each with a
    share of its node's CPUs for decoding, on a GPU cluster; else fractional CPUs (so that the
    driver's own tasks are never starved, as Ray's default of a whole CPU per actor would)."""
    embed = to_object(cfg.embed)
    gpus = cluster_gpus()
    pool = res.embed_pool(embed, gpus, res.cpus_per_gpu(ray.nodes()) if gpus else None)
    if pool.gpu and pool.actors * pool.options["num_gpus"] > gpus + 1e-6:
        log.warning("embed: %d actors of %s GPU each exceed the cluster's %d GPUs: the rest wait "
                    "for GPUs to join", pool.actors, pool.options["num_gpus"], gpus)  # fmt: skip
    log.info("embed: %d actor(s) with %s", pool.actors, pool.options)
    return [EmbedActor.options(**pool.options).remote(embed, pool.cpus) for _ in range(pool.actors)]


def _run_embed(cfg: PipelineConfig, layout: RunLayout, total_rows: int, previous) -> dict:
    """Embed every crawl shard whose done marker is missing or was computed from other inputs,
    or whose files no longer hold what the marker says."""
    from pipeline.stages.embed import part_intact

    layout.embed_dir.mkdir(parents=True, exist_ok=True)
    clear_temporaries(layout.embed_dir)
    settings = embed_identity(cfg)
    drops = _dedup_drops(layout)
    jobs, skipped = [], 0
    for shard in layout.crawl_done():
        part = layout.embed_part(shard.stats.name.split(".")[0])
        tok = token(settings, shard.stats.read_text(), sorted(drops.get(shard.index, ())))
        if part_intact(part, tok):
            skipped += 1
            continue
        jobs.append((shard, drops.get(shard.index, set()), part, tok))
    backbone = ((previous or {}).get("summary") or {}).get("backbone")
    images, failures, started = 0, 0, time.time()
    for marker, described in on_embedders(cfg, "embed_shard", jobs):
        backbone = described
        images += marker["count"]
        failures += marker["failures"]
        log.info("embed: shard %05d done (%d images, %d undecodable), %.1f images/s overall",
                 marker["shard"], marker["count"], marker["failures"],
                 images / max(time.time() - started, 1e-9))  # fmt: skip
    return {"embedded_shards": len(jobs), "skipped_shards": skipped, "images": images,
            "undecodable": failures, "backbone": backbone}  # fmt: skip


def embed_identity(cfg: PipelineConfig) -> dict:
    """What an embedding was computed from: the embed settings and the SHA-256 of the weights
    file. A backbone retrained in place (same embed.checkpoint path, new weights) thus
    re-embeds everything, and the later stages follow, rather than mixing two models."""
    from pretrain.models.loading import file_sha256, weights_file

    weights = weights_file(cfg.embed.checkpoint)
    key = (str(weights.resolve()), weights.stat().st_mtime_ns, weights.stat().st_size)
    if key not in _WEIGHTS_SHA:
        _WEIGHTS_SHA[key] = file_sha256(weights)
    return {**plan.stage_settings(cfg, "embed"), "weights_sha256": _WEIGHTS_SHA[key]}


_WEIGHTS_SHA: dict[tuple, str] = {}


def _dedup_drops(layout: RunLayout) -> dict[int, set[str]]:
    """Crawl shard index -> keys that exact/pHash dedup marks as duplicates (not embedded)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(layout.dedup_parquet, columns=["key", "duplicate_of"])
    drops: dict[int, set[str]] = collections.defaultdict(set)
    for key in table.filter(pc.is_valid(table["duplicate_of"]))["key"].to_pylist():
        drops[shard_of_key(key)].add(key)
    return drops


# -- semantic dedup ---------------------------------------------------------------------------


def _run_semdedup(cfg: PipelineConfig, layout: RunLayout, total_rows: int, previous) -> dict:
    """Copies by embedding and eval-set decontamination over every embedded sample."""
    from pipeline.stages import semdedup

    parts = layout.embed_done()
    eval_parts = _embed_eval_sets(cfg, layout)
    input_token = token(
        plan.stage_settings(cfg, "semdedup"),
        [read_stats(p.done)["token"] for p in parts],
        [read_stats(p.done)["token"] for p in eval_parts],
    )
    if plan.is_done(previous, input_token) and layout.semantic_parquet.exists():
        log.info("semdedup: up to date with the embeddings, skipped")
        return {"skipped": True, "input_token": input_token}
    pool, keys, areas = _load_pool(layout, parts)
    evals, eval_keys = _load_parts(eval_parts)
    sem = to_object(cfg.semdedup)
    table, result = semdedup.semantic_dedup(
        pool, keys, areas, sem, eval_parts=evals or None, eval_keys=eval_keys or None,
        decon_threshold=cfg.decontaminate.threshold,
        search=RaySearch(sem, [p.npy for p in parts], cluster_gpus()),
    )  # fmt: skip
    from pipeline.shardio import write_parquet_atomic

    write_parquet_atomic(table, layout.semantic_parquet)
    result["decontamination_sets"] = list(cfg.decontaminate.sets)
    write_stats(result, layout.semantic_summary)
    log.info("semdedup: %s", result)
    return {**result, "input_token": input_token}


def _load_parts(parts: list) -> tuple[list, list[str]]:
    from pipeline.stages.embed import read_part

    arrays, keys = [], []
    for part in parts:
        feats, part_keys = read_part(part)
        arrays.append(feats)
        keys += part_keys
    return arrays, keys


def _load_pool(layout: RunLayout, parts: list) -> tuple[list, list[str], Any]:
    """Memory-mapped embeddings per part, their keys, and each sample's original area."""
    import numpy as np
    import pyarrow.parquet as pq

    arrays, keys = _load_parts(parts)
    areas = np.zeros(len(keys), np.int64)
    row = 0
    for part, feats in zip(parts, arrays):
        shard = layout.crawl_shard(int(part.name))
        table = pq.read_table(shard.parquet, columns=["key", "original_width", "original_height"])
        area = {k: int(w or 0) * int(h or 0) for k, w, h in zip(*table.to_pydict().values())}
        for i, key in enumerate(keys[row : row + feats.shape[0]]):
            areas[row + i] = area.get(key, 0)
        row += feats.shape[0]
    return arrays, keys, areas


def _embed_eval_sets(cfg: PipelineConfig, layout: RunLayout) -> list:
    """Embed each decontamination set once (cached under RUN/embed/eval/) with the pool's model."""
    from pipeline.stages.embed import eval_set_files, part_intact

    if not cfg.decontaminate.sets:
        return []
    layout.eval_embed_dir.mkdir(parents=True, exist_ok=True)
    clear_temporaries(layout.eval_embed_dir)
    settings = embed_identity(cfg)
    parts, jobs = [], []
    for i, spec in enumerate(cfg.decontaminate.sets):
        listing = [(p, os.path.getsize(p)) for p, _ in eval_set_files(spec)]
        tok = token(settings, spec, listing)
        part = layout.embed_part(f"set{i:02d}", eval_set=True)
        parts.append(part)
        if not part_intact(part, tok):
            jobs.append((spec, part, tok))
    for marker, _ in on_embedders(cfg, "embed_eval_set", jobs):
        log.info("decontaminate: embedded %d images of %s", marker["count"], marker["set"])
    return parts


@ray.remote
def _search_task(blob, paths: list[str], index_of_part: int, start: int, stop: int,
                 first_row: int, k: int, thr: float, use_gpu: bool, float16: bool,
                 rescore: bool):  # fmt: skip
    """kNN edges of one query chunk: rows [start, stop) of one embeddings file (every file
    memory-mapped when IVF-PQ similarities are re-scored exactly), and where it ran. FAISS goes
    to the GPU only if this task was given one: a task that asked for none still sees every GPU
    of its node (Ray 2.60), which belong to other tasks."""
    import numpy as np

    from pipeline.stages import semdedup

    place = where()
    index = semdedup.deserialize_index(blob, use_gpu and bool(place["gpu_ids"]), float16)
    parts = [np.load(p, mmap_mode="r") for p in paths]
    queries = parts[index_of_part][start:stop]
    edges = semdedup.search_edges(index, queries, first_row, k, thr, parts if rescore else None)
    return edges, {**place, "faiss_gpu": semdedup.on_gpu(index)}


class RaySearch:
    """semantic_dedup's ``search``: the kNN queries over Ray tasks, one per query chunk, once the
    pool spans more than one chunk; each task reads its rows from the memory-mapped file and
    gets the index through the object store (put once). The tasks ask for GPUs as
    ``resources.search_placement`` says for this index on a cluster of ``gpus`` GPUs; where
    each ran is kept in ``placements``."""

    def __init__(self, sem: Any, paths: list[Path], gpus: int) -> None:
        self.sem, self.paths, self.gpus = sem, paths, gpus
        self.placements: list[dict] = []

    def __call__(self, index, parts, k: int, threshold: float, rescore: bool = False):
        from pipeline.stages import semdedup

        sem = self.sem
        if sum(p.shape[0] for p in parts) <= sem.query_chunk:
            return semdedup.search_all(index, parts, k, threshold, sem.query_chunk, rescore)
        place = res.search_placement(sem, self.gpus, gpu_index=not semdedup.cpu_only(index))
        task = _search_task.options(**place.options)
        blob = ray.put(semdedup.serialize_index(index))
        names = [str(p) for p in self.paths]
        refs, first = [], 0
        for i, part in enumerate(parts):
            for start in range(0, part.shape[0], sem.query_chunk):
                stop = min(start + sem.query_chunk, part.shape[0])
                refs.append(task.remote(blob, names, i, start, stop, first + start, k, threshold,
                                        place.gpu, sem.gpu_float16, rescore))  # fmt: skip
            first += part.shape[0]
        log.info("semdedup: %d query chunks over Ray tasks with %s", len(refs), place.options)
        done = ray.get(refs)
        self.placements = [p for _, p in done]
        log_placement("semdedup", self.placements)
        return semdedup.concat_edges([edges for edges, _ in done])
