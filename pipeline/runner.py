"""Runs the crawl on Ray: one task per input shard, a bounded number in flight.

The only module of the pipeline that imports Ray. The driver reads the input lazily, skips
shards whose stats.json exists (resume), submits the rest, logs progress as tasks finish, and
builds the dedup view at the end. Killing it at any moment loses nothing: a shard counts as done
only once its stats file is in place, and a rerun redoes unfinished shards from scratch.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path

import ray

from pipeline.config import CrawlConfig, PipelineConfig
from pipeline.crawl import crawl_shard
from pipeline.dedup import run_dedup
from pipeline.shardio import clear_temporaries, is_done, read_stats, shard_paths
from pipeline.sources import iter_shards
from pretrain.configtools import to_object

log = logging.getLogger(__name__)


@ray.remote(max_retries=2)
def _crawl_task(table, shard_index: int, crawl_dir: str, crawl: CrawlConfig, kind: str) -> dict:
    logging.basicConfig(level=logging.INFO)
    return crawl_shard(table, shard_index, Path(crawl_dir), crawl, kind)


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


class Progress:
    """Aggregates finished shards' stats; logs URLs/s, success rate and failures by reason."""

    def __init__(self, total_rows: int) -> None:
        self.total_rows = total_rows
        self.started = time.time()
        self.rows = self.successes = self.shards = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.failed_shards: list[int] = []

    def add(self, stats: dict) -> None:
        self.shards += 1
        self.rows += stats["count"]
        self.successes += stats["successes"]
        self.errors.update(stats["errors"])
        elapsed = max(time.time() - self.started, 1e-9)
        top = ", ".join(f"{k}={v}" for k, v in self.errors.most_common(5)) or "none"
        log.info(
            "shard %05d done: %d/%d rows, %.1f URLs/s, success %.1f%%, failures: %s",
            stats["shard"], self.rows, self.total_rows, self.rows / elapsed,
            100.0 * self.successes / max(self.rows, 1), top,
        )  # fmt: skip


def run_crawl(cfg: PipelineConfig, total_rows: int, address: str | None = None) -> dict:
    """Crawl every shard not yet done; returns counts of this invocation."""
    crawl_dir = Path(cfg.output_dir) / "crawl"
    crawl_dir.mkdir(parents=True, exist_ok=True)
    clear_temporaries(crawl_dir)
    crawl = to_object(cfg.crawl)
    connect(cfg, address)
    try:
        in_flight_limit = cfg.ray.max_tasks_in_flight or max(
            2, 2 * int(ray.cluster_resources().get("CPU", 1))
        )
        progress = Progress(total_rows)
        pending: dict[ray.ObjectRef, int] = {}
        skipped = 0
        for index, table in iter_shards(cfg.input, crawl.shard_size):
            if is_done(crawl_dir, index) and not (
                crawl.retry_failed and _has_failures(crawl_dir, index)
            ):
                skipped += 1
                continue
            while len(pending) >= in_flight_limit:
                _collect_one(pending, progress)
            task = _crawl_task.options(num_cpus=cfg.ray.cpus_per_task)
            pending[task.remote(table, index, str(crawl_dir), crawl, cfg.input.kind)] = index
        while pending:
            _collect_one(pending, progress)
    finally:
        ray.shutdown()
    log.info("crawl finished: %d shards crawled, %d already done", progress.shards, skipped)
    summary = {
        "crawled_shards": progress.shards,
        "skipped_shards": skipped,
        "failed_shards": progress.failed_shards,
    }
    if cfg.dedup.enabled:
        summary["dedup"] = run_dedup(Path(cfg.output_dir), cfg.dedup.phash_threshold)
    return summary


def _collect_one(pending: dict[ray.ObjectRef, int], progress: Progress) -> None:
    """Wait for one shard task; a task that failed even after Ray's retries is logged and
    left without a stats file, so the next run redoes it."""
    done, _ = ray.wait(list(pending), num_returns=1)
    index = pending.pop(done[0])
    try:
        progress.add(ray.get(done[0]))
    except ray.exceptions.RayError as exc:
        log.error("shard %05d failed, rerun to redo it: %s", index, exc)
        progress.failed_shards.append(index)


def _has_failures(crawl_dir: Path, index: int) -> bool:
    return read_stats(shard_paths(crawl_dir, index)["stats"])["failures"] > 0
