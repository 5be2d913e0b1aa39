"""The run directory: every path, done marker and table schema the pipeline writes.

Every reader and writer of a run directory goes through this module, so the layout is spelt out
once. The training side (``pretrain``) never imports the pipeline: it reads the plain shard list
``RUN/train_shards.txt`` that the pipeline keeps up to date (one tar path per line, relative to
the run directory).

    RUN/config.yaml                       resolved config of the latest invocation
    RUN/stages/<stage>.json               per stage: settings, state (running / done), summary
    RUN/crawl/NNNNN.{tar,parquet,stats.json}   stats.json written last: the shard's done marker
    RUN/dedup/dedup.parquet               exact + pHash verdicts (key, duplicate_of, reason, distance)
    RUN/dedup/summary.json
    RUN/embed/NNNNN.npy                   float16 [n, D], L2-normalised, row i <-> keys row i
    RUN/embed/NNNNN.keys.parquet          key per row (and the samples that failed to decode)
    RUN/embed/NNNNN.done.json             written last: count, dim, token of its inputs
    RUN/embed/eval/<set>.{npy,keys.parquet,done.json}   evaluation sets, same format
    RUN/dedup/semantic.parquet            semantic + eval verdicts (key, duplicate_of, reason, ...)
    RUN/dedup/semantic_summary.json
    RUN/clusters/levelT/{centroids,assignment,distances}.npy   per level (inputs: the kept
                                          pool for level 1, level T-1's centroids above)
    RUN/clusters/assignments.parquet      key, cluster_l1..lN, distance (to its level-1 centroid)
    RUN/seeds/crawl/00000.*               the seed images, crawled like the pool
    RUN/embed/seeds/set00.*               the seed images, embedded like the pool
    RUN/curated/selection.parquet         key, selected_by, query_key, query_distance, multiplicity
    RUN/curated/shards/NNNNNN.tar         the training data (+ NNNNNN.done.json markers)
    RUN/curated/manifest.parquet          one row per curated sample
    RUN/curated/summary.json              counts per stage and reason, balance, shard list
    RUN/train_shards.txt                  the tars a training run should read
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

KEY_SHARD_DIGITS = 5  # a sample key is the 5-digit crawl shard index, then the row index
CURATED_SHARD_DIGITS = 6  # RUN/curated/shards/NNNNNN.tar
TRAIN_SHARD_LIST = "train_shards.txt"

CRAWL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("http_status", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("phash", pa.uint64()),
        ("jpg_sha256", pa.string()),
    ]
)
# Fields the pipeline writes into a sample's manifest row and JSON after the crawl columns:
# verdicts and the curation's columns (plus one cluster_lN per k-means level).
CURATION_FIELDS = ("duplicate_of", "reason", "distance", "similarity", "component", "shard",
                   "selected_by", "query_key", "query_distance", "multiplicity", "source_key",
                   "repeat_index")  # fmt: skip


def is_reserved_field(name: str) -> bool:
    """True for a name the pipeline writes itself: an input column of that name is renamed."""
    level = name.removeprefix("cluster_l")
    return (
        name in CRAWL_SCHEMA.names or name in CURATION_FIELDS or (level != name and level.isdigit())
    )


DEDUP_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("duplicate_of", pa.string()),
        ("reason", pa.string()),
        ("distance", pa.int32()),
    ]
)
EMBED_KEYS_SCHEMA = pa.schema([("key", pa.string())])
EMBED_FAILURES_SCHEMA = pa.schema([("key", pa.string()), ("error", pa.string())])
SEMANTIC_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("duplicate_of", pa.string()),
        ("reason", pa.string()),
        ("similarity", pa.float32()),
        ("component", pa.int64()),
    ]
)


def shard_name(index: int) -> str:
    return f"{index:0{KEY_SHARD_DIGITS}d}"


def curated_shard_name(index: int) -> str:
    return f"{index:0{CURATED_SHARD_DIGITS}d}"


def shard_of_key(key: str) -> int:
    return int(key[:KEY_SHARD_DIGITS])


@dataclass(frozen=True)
class CrawlShard:
    index: int
    tar: Path
    parquet: Path
    stats: Path


@dataclass(frozen=True)
class EmbedPart:
    name: str
    npy: Path
    keys: Path
    done: Path


def crawl_shard_files(crawl_dir: Path, index: int) -> CrawlShard:
    name = shard_name(index)
    d = Path(crawl_dir)
    return CrawlShard(index, d / f"{name}.tar", d / f"{name}.parquet", d / f"{name}.stats.json")


class RunLayout:
    """Paths of one run directory; no I/O but listing."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.stages_dir = self.root / "stages"
        self.crawl_dir = self.root / "crawl"
        self.dedup_dir = self.root / "dedup"
        self.dedup_parquet = self.dedup_dir / "dedup.parquet"
        self.dedup_summary = self.dedup_dir / "summary.json"
        self.semantic_parquet = self.dedup_dir / "semantic.parquet"
        self.semantic_summary = self.dedup_dir / "semantic_summary.json"
        self.embed_dir = self.root / "embed"
        self.eval_embed_dir = self.embed_dir / "eval"
        self.train_shard_list = self.root / TRAIN_SHARD_LIST
        self.clusters_dir = self.root / "clusters"
        self.assignments = self.clusters_dir / "assignments.parquet"
        self.seed_embed_dir = self.embed_dir / "seeds"
        self.seed_crawl_dir = self.root / "seeds" / "crawl"
        self.curated_dir = self.root / "curated"
        self.selection = self.curated_dir / "selection.parquet"
        self.curated_shards_dir = self.curated_dir / "shards"
        self.curated_manifest = self.curated_dir / "manifest.parquet"
        self.curated_summary = self.curated_dir / "summary.json"

    def curated_shard(self, index: int) -> Path:
        return self.curated_shards_dir / f"{curated_shard_name(index)}.tar"

    def level_dir(self, level: int) -> Path:
        return self.clusters_dir / f"level{level}"

    def stage_file(self, stage: str) -> Path:
        return self.stages_dir / f"{stage}.json"

    def crawl_shard(self, index: int) -> CrawlShard:
        return crawl_shard_files(self.crawl_dir, index)

    def crawl_done(self) -> list[CrawlShard]:
        """Finished crawl shards (their stats file exists), in index order."""
        indices = sorted(int(p.name.split(".")[0]) for p in self.crawl_dir.glob("*.stats.json"))
        return [self.crawl_shard(i) for i in indices]

    def embed_part(self, name: str, eval_set: bool = False, seeds: bool = False) -> EmbedPart:
        d = self._embed_dir(eval_set, seeds)
        return EmbedPart(
            name, d / f"{name}.npy", d / f"{name}.keys.parquet", d / f"{name}.done.json"
        )

    def _embed_dir(self, eval_set: bool, seeds: bool) -> Path:
        return self.seed_embed_dir if seeds else self.eval_embed_dir if eval_set else self.embed_dir

    def embed_done(self, eval_set: bool = False, seeds: bool = False) -> list[EmbedPart]:
        d = self._embed_dir(eval_set, seeds)
        names = sorted(p.name[: -len(".done.json")] for p in d.glob("*.done.json"))
        return [self.embed_part(n, eval_set, seeds) for n in names]

    def stage_dirs(self, stage: str) -> list[Path]:
        """What `redo=<stage>` removes (the stage's own outputs)."""
        return {
            "crawl": [self.crawl_dir, self.train_shard_list],
            "dedup": [self.dedup_parquet, self.dedup_summary],
            "embed": [self.embed_dir],
            "semdedup": [self.semantic_parquet, self.semantic_summary],
            "cluster": [self.clusters_dir],
            "curate": [self.selection, self.seed_embed_dir, self.seed_crawl_dir],
            "write": [self.curated_shards_dir, self.curated_manifest, self.curated_summary],
        }[stage]


def clear_temporaries(directory: Path) -> None:
    """Remove half-written files a killed run left behind."""
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def token(*parts: object) -> str:
    """A short content hash of JSON-serialisable parts: what a done marker was computed from."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
