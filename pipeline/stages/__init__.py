"""The curation stages, in the order they run.

    crawl     Ray tasks, one per input shard: fetch, verify, resize, hash    -> RUN/crawl/
    dedup     driver: exact (sha256) and near-exact (pHash) duplicates        -> RUN/dedup/dedup.parquet
    embed     Ray actors: the ViT's L2-normalised features of every survivor  -> RUN/embed/
    semdedup  FAISS kNN graph: copies by embedding, eval-set decontamination  -> RUN/dedup/semantic.parquet

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
    ),  # fmt: skip
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
            "semdedup.pq_m",
            "decontaminate",
        ),
    ),  # fmt: skip
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def later_stages(name: str) -> list[str]:
    """``name`` and every stage after it."""
    return list(STAGE_NAMES[STAGE_NAMES.index(name) :])
