"""Selection: retrieval around seed images and balanced sampling over the clusters.

Plain functions, no Ray (the runner embeds the seeds with the embed stage's actors and calls
these). As DINOv2 selects LVD-142M, and Vo et al. balance it:

- sample-based retrieval (large seed sets): the ``per_seed`` nearest pool images of every seed
  image (DINOv2: 4), exact inner-product search (an inverted index above ``retrieval_ivf_min_size``); a pool
  image retrieved by several seeds (a collision) is kept once, with its closest seed;
- cluster-based retrieval (small seed sets): every level-1 cluster holding more than
  ``min_seeds_per_cluster`` seed images gives up to ``per_cluster`` of its images (the closest
  to its centroid first), clusters with the most seeds first, ``max_per_seed_set`` in all;
- balanced hierarchical sampling (``pipeline.stages.sampling``) fills the selection up to
  ``target_size``, never picking a retrieved image again;
- ``mode=random``: a uniform sample of ``target_size`` pool images, the control that tells
  whether curation beats no curation at the same size.

The pool is every embedded sample that semantic dedup keeps; rows here are pool rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

MODES = ("auto", "retrieval", "balanced", "both", "random")
REFINE = 8  # IVF-PQ retrieval: candidates per wanted neighbour, re-ranked exactly
RETRIEVALS = ("auto", "sample", "cluster")


class RowSubset:
    """Some rows of a (memory-mapped) array, read on demand: ``shape`` and slicing / integer
    indexing like an array, so the stage functions stream the kept pool without copying it."""

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array, self.rows = array, np.asarray(rows, np.int64)
        self.shape = (len(self.rows), array.shape[1])
        self.dtype = array.dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item) -> np.ndarray:
        return np.asarray(self.array[self.rows[item]])


def check_curate_config(cfg) -> None:
    """Raise ValueError naming the first curate setting outside its range."""
    if cfg.mode not in MODES:
        raise ValueError(f"curate.mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.include_seeds and not cfg.seeds:
        raise ValueError("curate.include_seeds needs curate.seeds")
    if cfg.strategy not in ("random", "closest"):
        raise ValueError(f"curate.strategy must be random or closest, got {cfg.strategy!r}")
    if cfg.retrieval not in RETRIEVALS:
        raise ValueError(f"curate.retrieval must be one of {RETRIEVALS}, got {cfg.retrieval!r}")
    for name in ("per_seed", "per_cluster", "max_per_seed_set", "shard_size", "max_repeat"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"curate.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.min_seeds_per_cluster < 0 or cfg.target_size < 0:
        raise ValueError("curate.min_seeds_per_cluster and curate.target_size must be >= 0")
    mode = resolved_mode(cfg)
    if mode in ("retrieval", "both") and not cfg.seeds:
        raise ValueError("curate.mode=retrieval needs curate.seeds (a folder or tar glob)")
    if mode == "balanced" and cfg.target_size < 1:
        raise ValueError("curate.target_size must be >= 1 for balanced sampling (no seeds given)")
    if mode == "random" and cfg.target_size < 1:
        raise ValueError("curate.mode=random needs curate.target_size >= 1")


def resolved_mode(cfg) -> str:
    """retrieval | balanced | both (retrieval first, balanced sampling fills the rest)."""
    if cfg.mode != "auto":
        return cfg.mode
    if cfg.seeds:
        return "both" if cfg.target_size else "retrieval"
    return "balanced"


def uniform_sample(n: int, size: int, seed: int) -> np.ndarray:
    """``min(size, n)`` distinct pool rows drawn uniformly (sorted), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def retrieval_kind(cfg, n_seeds: int) -> str:
    if cfg.retrieval != "auto":
        return cfg.retrieval
    return "cluster" if n_seeds < cfg.cluster_based_below else "sample"


def sample_based(
    index, seeds: np.ndarray, per_seed: int, exact_parts: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(pool rows, their closest seed row, cosine, collisions): the ``per_seed`` nearest pool
    images of every seed, each pool image once (with its most similar seed). With
    ``exact_parts`` (an IVF-PQ index) the similarities are recomputed from the embeddings."""
    from pipeline.stages.semdedup import exact_sims

    k = min(per_seed, index.ntotal)
    seeds = np.ascontiguousarray(seeds, dtype=np.float32)
    if exact_parts is None:
        sims, rows = index.search(seeds, k)
    else:  # PQ ranks coarsely inside dense regions: take REFINE x k candidates, re-rank exactly
        sims, rows = index.search(seeds, min(REFINE * k, index.ntotal))
        sims = exact_sims(seeds, rows, exact_parts)
        best = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        sims, rows = np.take_along_axis(sims, best, 1), np.take_along_axis(rows, best, 1)
    seed_rows = np.repeat(np.arange(len(seeds)), k)
    sims, rows = sims.reshape(-1), rows.reshape(-1).astype(np.int64)
    valid = rows >= 0
    sims, rows, seed_rows = sims[valid], rows[valid], seed_rows[valid]
    order = np.lexsort((-sims, rows))  # by pool row, most similar seed first
    first = np.ones(len(order), bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    keep = order[first]
    return rows[keep], seed_rows[keep], sims[keep].astype(np.float32), int(len(rows) - len(keep))


def cluster_based(
    seed_labels: np.ndarray, pool_labels: np.ndarray, pool_distances: np.ndarray, cfg
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(pool rows, their level-1 cluster, info): whole clusters where the seeds gather."""
    counts = np.bincount(seed_labels, minlength=int(pool_labels.max(initial=0)) + 1)
    chosen = np.nonzero(counts > cfg.min_seeds_per_cluster)[0]
    chosen = chosen[np.argsort(-counts[chosen], kind="stable")]  # most seeds first
    picked, budget = [], cfg.max_per_seed_set
    for cluster in chosen.tolist():
        members = np.nonzero(pool_labels == cluster)[0]
        members = members[np.argsort(pool_distances[members], kind="stable")]
        take = members[: min(cfg.per_cluster, budget)]
        picked.append(take)
        budget -= len(take)
        if budget <= 0:
            break
    rows = np.concatenate(picked) if picked else np.zeros(0, np.int64)
    info = {"clusters_with_seeds": int((counts > 0).sum()), "clusters_taken": len(picked),
            "capped": budget <= 0}  # fmt: skip
    return rows, pool_labels[rows], info


def balance_report(labels: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """Cluster count, min / median / max size and normalised entropy of a labelling (with
    optional per-row weights, e.g. multiplicities)."""
    sizes = np.bincount(labels, weights=weights)
    sizes = sizes[sizes > 0]
    if not len(sizes):
        return {"clusters": 0}
    p = sizes / sizes.sum()
    entropy = float(-(p * np.log(p)).sum() / np.log(len(p))) if len(p) > 1 else 1.0
    return {"clusters": int(len(sizes)), "min": int(sizes.min()),
            "median": float(np.median(sizes)), "max": int(sizes.max()),
            "normalised_entropy": round(entropy, 4)}  # fmt: skip
