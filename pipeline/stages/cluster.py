"""Hierarchical spherical k-means with resampling (Vo et al. 2024) over stored embeddings.

Plain functions, no Ray: the runner may draw each level's training sample and train here, then
spread the assignment of every input over Ray tasks (``assign`` per chunk, the centroids
shipped as a float32 array), or call ``hierarchical_kmeans`` in-process.

Levels are numbered from 1 as in the paper. Level 1 clusters the embeddings, level t > 1
clusters the centroids of level t-1. Every level is spherical: inputs are L2-normalised,
centroids are re-normalised after every update (FAISS ``spherical=True``), and a point belongs
to the centroid with the largest inner product (cosine).

One level (``training_sample`` + ``train_level``, then ``assign`` over every input):

1. Training sample: the level's inputs if there are at most ``k * max_points_per_centroid``
   of them, else a uniform sample of that many (FAISS's own points-per-centroid rule, applied
   here so that only the sample is ever gathered in memory; FAISS then never subsamples).
2. k-means on the sample: ``iterations`` Lloyd iterations in FAISS, from k-means++ seeds
   (``init="kmeans++"``, our own, on a sampled candidate set) or from FAISS's random init.
3. Resampling, ``resampling_steps[t-1]`` times: assign the *training sample* to the current
   centroids, keep the ``sample_size`` sample points closest to each centroid, and run a fresh
   k-means (new seed, same init method) on those points only; its centroids replace the
   current ones. A fresh start is what makes resampling work: the kept points are spread like
   the centroids, not like the data, so a new k-means on them puts fewer centroids into dense
   regions; warm-started from the current centroids it would stay where it is. When the sample
   is the whole level (levels > 1, and level 1 below the sample rule) this is exactly Vo et
   al.'s "reassign every point"; above the rule the reassignment inside resampling covers the
   training sample only, and every input is assigned once, to the final centroids.
4. Assignment of every input: nearest centroid by inner product; the distance reported is
   ``1 - cosine`` (float32, clipped at 0): 0 at the centroid, 2 opposite to it.

Seeds: the first k-means of level t uses ``seed + 1000 * (t - 1)``, resampling step j
adds j, so level 1 without resampling is a plain ``faiss.Kmeans(seed=seed)`` run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import ClusterConfig  # noqa: F401  (re-exported)
from pipeline.resources import check_gpus_per_task, index_to_gpus
from pipeline.stages.semdedup import (
    check_normalised,
    chunks,
    embedding_dim,
    gpu_available,
    rows_of,
)

log = logging.getLogger(__name__)

INIT_METHODS = ("kmeans++", "faiss")
KPP_CANDIDATES_PER_CENTROID = 8  # k-means++ seeds are drawn from min(n, 8 k) sample points
SEED_LEVEL_STRIDE = 1000


@dataclass
class Level:
    """One level: ``assignment`` and ``distances`` (1 - cosine) cover the level's inputs,
    every embedding for level 1, the centroids of level t-1 for level t."""

    centroids: np.ndarray  # float32 [k, d], unit rows
    assignment: np.ndarray  # int64 [n_inputs]
    distances: np.ndarray  # float32 [n_inputs]

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


# -- config and inputs ------------------------------------------------------------------------


def check_cluster_config(cfg) -> None:
    """Raise ValueError naming the first cluster setting outside its range."""
    levels = list(cfg.levels)
    if not levels:
        raise ValueError("cluster.levels must list at least one level")
    for t, k in enumerate(levels):
        if int(k) != k or k < 1:
            raise ValueError(f"cluster.levels[{t}] must be an integer >= 1, got {k}")
        if t and k >= levels[t - 1]:
            raise ValueError(
                f"cluster.levels must be strictly decreasing: levels[{t}]={k} >= "
                f"levels[{t - 1}]={levels[t - 1]}"
            )
    for name in ("resampling_steps", "sample_sizes"):
        values = list(getattr(cfg, name))
        if len(values) != len(levels):
            raise ValueError(
                f"cluster.{name} needs one value per level ({len(levels)}), got {values}"
            )
        for t, v in enumerate(values):
            if int(v) != v or v < 0:
                raise ValueError(f"cluster.{name}[{t}] must be an integer >= 0, got {v}")
    if cfg.init not in INIT_METHODS:
        raise ValueError(f"cluster.init must be one of {INIT_METHODS}, got {cfg.init!r}")
    for name in ("iterations", "max_points_per_centroid", "assign_chunk"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"cluster.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise ValueError(f"cluster.seed must be >= 0, got {cfg.seed}")
    check_gpus_per_task(cfg.gpus_per_task, "cluster.gpus_per_task")


def _as_parts(parts) -> list[np.ndarray]:
    return [parts] if isinstance(parts, np.ndarray) else list(parts)


def check_inputs(parts, cfg) -> int:
    """The number of embeddings, or ValueError on a config or input ``hierarchical_kmeans``
    cannot use: 2-D parts of one dimension, more embeddings than level-1 clusters, unit rows
    (checked on the first rows of every part)."""
    check_cluster_config(cfg)
    parts = _as_parts(parts)
    n = sum(p.shape[0] for p in parts)
    embedding_dim(parts, "cluster")
    if cfg.levels[0] > n:
        raise ValueError(f"cluster.levels[0]={cfg.levels[0]} exceeds the {n} embeddings")
    check_normalised(parts, "cluster")
    return n


def normalise(x: np.ndarray) -> np.ndarray:
    """float32 copy with unit rows (zero rows stay zero)."""
    x = np.array(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def kmeans_seed(cfg, level: int, step: int = 0) -> int:
    """FAISS seed of the first k-means (step 0) and of resampling step ``step`` of ``level``."""
    return (int(cfg.seed) + SEED_LEVEL_STRIDE * (level - 1) + step) % (2**31)


def sample_size(cfg, level: int, n_sample: int, k: int) -> int:
    """Points kept per cluster when resampling ``level`` (1-based): the configured value, or
    for 0 half the average cluster size of the ``n_sample`` training points (at least 1)."""
    size = int(cfg.sample_sizes[level - 1])
    return size if size else max(1, n_sample // k // 2)


# -- training ---------------------------------------------------------------------------------


def training_size(n: int, k: int, cfg) -> int:
    return min(n, k * cfg.max_points_per_centroid)


def training_sample(parts, k: int, cfg, level: int) -> np.ndarray:
    """float32 [m, d]: the training sample of a level with ``k`` clusters whose inputs are
    ``parts`` (possibly memory-mapped float16): every row in order if m = n, else m =
    k * max_points_per_centroid rows drawn uniformly without replacement (seeded by
    ``cfg.seed`` and ``level``), in ascending row order."""
    parts = _as_parts(parts)
    n = sum(p.shape[0] for p in parts)
    m = training_size(n, k, cfg)
    if m == n:
        rows = np.arange(n, dtype=np.int64)
    else:
        rng = np.random.default_rng([int(cfg.seed), level])
        rows = np.sort(rng.choice(n, size=m, replace=False))
    return np.ascontiguousarray(rows_of(parts, rows))


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int, candidates: int = 0) -> np.ndarray:
    """k initial centroids by k-means++ (D^2 sampling, squared L2 between unit vectors), run
    on a uniform candidate set of ``candidates`` rows of ``x`` (default: min(n, 8 k)) so that
    its cost is O(k * candidates * d) rather than O(k n d)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    c = min(n, max(k, candidates or KPP_CANDIDATES_PER_CENTROID * k))
    pool = x if c == n else x[np.sort(rng.choice(n, size=c, replace=False))]
    pool = np.ascontiguousarray(pool, np.float32)
    sq = np.einsum("ij,ij->i", pool, pool)
    chosen = np.empty(k, np.int64)
    chosen[0] = rng.integers(c)
    d2 = np.maximum(sq + sq[chosen[0]] - 2 * (pool @ pool[chosen[0]]), 0)
    for i in range(1, k):
        total = float(d2.sum())
        if total > 0:
            pick = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
            pick = min(pick, c - 1)
        else:  # every candidate sits on a chosen one (duplicates): any unchosen row
            free = np.setdiff1d(np.arange(c), chosen[:i])
            pick = int(rng.choice(free))
        chosen[i] = pick
        np.minimum(d2, np.maximum(sq + sq[pick] - 2 * (pool @ pool[pick]), 0), out=d2)
        d2[pick] = 0
    return pool[chosen].copy()


def kmeans(x: np.ndarray, k: int, cfg, seed: int) -> np.ndarray:
    """float32 [k, d] unit centroids: one spherical FAISS k-means of ``x`` (float32 [n, d])."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    km = faiss.Kmeans(
        x.shape[1], k, niter=int(cfg.iterations), spherical=True, seed=int(seed),
        max_points_per_centroid=int(cfg.max_points_per_centroid), min_points_per_centroid=1,
        gpu=gpu_available(cfg.use_gpu), verbose=False,
    )  # fmt: skip
    init = kmeans_plus_plus(x, k, seed) if cfg.init == "kmeans++" else None
    km.train(x, init_centroids=init)
    return normalise(km.centroids)


def closest_per_cluster(labels: np.ndarray, distances: np.ndarray, size: int) -> np.ndarray:
    """Sorted rows of the ``size`` points of every cluster closest to its centroid (all of a
    smaller cluster); ties by row."""
    order = np.lexsort((np.arange(len(labels)), distances, labels))
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - first
    return np.sort(order[rank < size])


def train_level(points_sample: np.ndarray, k: int, cfg, level: int) -> np.ndarray:
    """float32 [k, d] unit centroids of ``level`` (1-based) from its training sample
    (``training_sample``): the first k-means, then ``resampling_steps[level - 1]`` resampling
    steps, each reassigning the training sample only (module docstring)."""
    check_cluster_config(cfg)
    x = np.ascontiguousarray(points_sample, np.float32)
    if x.ndim != 2:
        raise ValueError(f"cluster: training sample must be 2-D, got shape {x.shape}")
    if k > len(x):
        raise ValueError(
            f"cluster.levels[{level - 1}]={k} exceeds the {len(x)} points of level {level}"
        )
    check_normalised([x], f"cluster level {level} input")
    centroids = kmeans(x, k, cfg, kmeans_seed(cfg, level))
    steps = int(cfg.resampling_steps[level - 1])
    size = sample_size(cfg, level, len(x), k)
    for step in range(1, steps + 1):
        labels, dist = assign(centroids, x, cfg.use_gpu, cfg.gpu_float16)
        keep = closest_per_cluster(labels, dist, size)
        if len(keep) < k:  # empty clusters left fewer than k points: nothing to resample
            log.warning("cluster level %d: resampling kept %d points for %d clusters; "
                        "stopping after %d steps", level, len(keep), k, step - 1)  # fmt: skip
            break
        centroids = kmeans(x[keep], k, cfg, kmeans_seed(cfg, level, step))
    return centroids


# -- assignment -------------------------------------------------------------------------------


def centroid_index(centroids: np.ndarray, use_gpu: bool = False, float16: bool = False):
    """An exact inner-product FAISS index over ``centroids`` (on the GPU(s) when asked and
    present: ``index_to_gpus``, filled first as a sharded flat index must be; ``float16``
    stores the centroids in half precision there)."""
    import faiss

    centroids = np.ascontiguousarray(centroids, np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    if gpu_available(use_gpu):
        index = index_to_gpus(index, centroids.nbytes, float16)
    return index


def _nearest(index, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims, labels = index.search(np.ascontiguousarray(queries, np.float32), 1)
    return labels[:, 0].astype(np.int64), np.maximum(1 - sims[:, 0], 0).astype(np.float32)


def assign(
    centroids: np.ndarray, queries: np.ndarray, use_gpu: bool = False, float16: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 labels, float32 distances = 1 - cosine) of the nearest centroid (largest inner
    product) of every query row; one chunk, e.g. one Ray task."""
    return _nearest(centroid_index(centroids, use_gpu, float16), queries)


def assign_parts(
    centroids: np.ndarray, parts, chunk: int, use_gpu: bool = False, float16: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``assign`` over every row of ``parts`` (possibly memory-mapped float16), ``chunk`` rows
    at a time, in this process; one float32 chunk in memory at a time."""
    parts = _as_parts(parts)
    n = sum(p.shape[0] for p in parts)
    labels, distances = np.empty(n, np.int64), np.empty(n, np.float32)
    index = centroid_index(centroids, use_gpu, float16)
    for row, block in chunks(parts, chunk):
        labels[row : row + len(block)], distances[row : row + len(block)] = _nearest(index, block)
    return labels, distances


# -- hierarchy --------------------------------------------------------------------------------


def hierarchical_kmeans(parts, cfg) -> list[Level]:
    """Every level of the hierarchy (module docstring), in this process. ``parts``: the
    L2-normalised embeddings, one array or a list of (memory-mapped, float16) parts in row
    order."""
    parts = _as_parts(parts)
    check_inputs(parts, cfg)
    levels: list[Level] = []
    inputs: list[np.ndarray] = parts
    for level, k in enumerate(cfg.levels, start=1):
        if k > sum(p.shape[0] for p in inputs):  # unreachable with strictly decreasing levels
            raise ValueError(f"cluster.levels[{level - 1}]={k} exceeds the level's inputs")
        centroids = train_level(training_sample(inputs, k, cfg, level), k, cfg, level)
        labels, distances = assign_parts(centroids, inputs, cfg.assign_chunk, cfg.use_gpu,
                                         cfg.gpu_float16)  # fmt: skip
        levels.append(Level(centroids, labels, distances))
        log.info("cluster level %d: %d clusters, %d non-empty", level, k, len(np.unique(labels)))
        inputs = [centroids]
    return levels


def labels_at(levels: Sequence[Level], level: int) -> np.ndarray:
    """int64 [n]: the level-``level`` (1-based) cluster of every embedding, composing the
    assignments of levels 1..level."""
    if not 1 <= level <= len(levels):
        raise ValueError(f"level must be in [1, {len(levels)}], got {level}")
    labels = levels[0].assignment
    for t in range(1, level):
        labels = levels[t].assignment[labels]
    return labels


def check_levels(levels: Sequence[Level]) -> int:
    """The number of embeddings, or ValueError if the levels do not chain (level t assigns
    exactly the centroids of level t-1, labels within range)."""
    if not levels:
        raise ValueError("levels: at least one level needed")
    for t, lv in enumerate(levels):
        n_inputs = len(lv.assignment) if t == 0 else levels[t - 1].k
        if len(lv.assignment) != n_inputs or len(lv.distances) != n_inputs:
            raise ValueError(
                f"levels[{t}] assigns {len(lv.assignment)} inputs with {len(lv.distances)} "
                f"distances, expected {n_inputs}"
            )
        if n_inputs and (lv.assignment.min() < 0 or lv.assignment.max() >= lv.k):
            raise ValueError(f"levels[{t}].assignment has labels outside [0, {lv.k})")
    return len(levels[0].assignment)
