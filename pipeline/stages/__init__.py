"""The curation stages, in the order they run.

    crawl     Ray tasks, one per input shard: fetch, verify, resize, hash    -> RUN/crawl/
    dedup     driver: exact (sha256) and near-exact (pHash) duplicates        -> RUN/dedup/dedup.parquet
    embed     Ray actors: the ViT's L2-normalised features of every survivor  -> RUN/embed/
    semdedup  FAISS kNN graph: copies by embedding, eval-set decontamination  -> RUN/dedup/semantic.parquet
    cluster   hierarchical k-means of the kept pool (sampled fit, Ray assign) -> RUN/clusters/
    curate    retrieval around seed images + balanced sampling               -> RUN/curated/selection.parquet
    write     curated WebDataset shards (Ray tasks), manifest, summary        -> RUN/curated/

Each stage module holds plain functions over one shard or one chunk (testable without Ray);
`pipeline.runner` schedules them. A stage's ``settings`` are the config keys that define its
output: changing one of them after the stage ran is refused unless the run asks to redo it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    requires: tuple[str, ...]  # stages whose outputs this one reads
    settings: tuple[str, ...]  # dotted config keys that define this stage's output


STAGES: tuple[Stage, ...] = (
    Stage(
        "crawl",
        (),
        (
            "input",
            "crawl.shard_size",
            "crawl.image_size",
            "crawl.resize_mode",
            "crawl.min_size",
            "crawl.jpeg_quality",
        ),
    ),
    Stage("dedup", ("crawl",), ("dedup.phash_threshold",)),
    Stage(
        "embed",
        ("crawl", "dedup"),
        ("embed.checkpoint", "embed.image_size", "embed.features"),
    ),
    Stage(
        "semdedup",
        ("embed",),
        (
            "semdedup.k",
            "semdedup.threshold",
            "semdedup.index",
            "semdedup.ivf_min_size",
            "semdedup.ivf_nlist",
            "semdedup.ivf_nprobe",
            "semdedup.imi_bits",
            "semdedup.pq_m",
            "semdedup.max_component_share",
            "decontaminate",
        ),
    ),
    Stage(
        "cluster",
        ("embed", "semdedup"),
        (
            "cluster.levels",
            "cluster.iterations",
            "cluster.resampling_steps",
            "cluster.sample_sizes",
            "cluster.init",
            "cluster.max_points_per_centroid",
            "cluster.seed",
        ),
    ),
    Stage(
        "curate",
        ("embed", "semdedup", "cluster"),
        (
            "curate.seeds",
            "curate.mode",
            "curate.retrieval",
            "curate.cluster_based_below",
            "curate.per_seed",
            "curate.min_seeds_per_cluster",
            "curate.per_cluster",
            "curate.max_per_seed_set",
            "curate.retrieval_ivf_min_size",
            "curate.retrieval_pq_m",
            "curate.target_size",
            "curate.strategy",
            "curate.max_repeat",
            "curate.include_seeds",
            "curate.seed",
        ),
    ),
    Stage("write", ("crawl", "curate"), ("curate.shard_size", "curate.seed")),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def later_stages(name: str) -> list[str]:
    """``name`` and every stage after it."""
    return list(STAGE_NAMES[STAGE_NAMES.index(name) :])
