"""Balanced hierarchical sampling (Vo et al. 2024) from the levels of ``cluster.py``.

Plain functions, no Ray, vectorised per level (no Python loop over clusters).

Every cluster has a capacity: ``max_repeat`` times the number of embeddings under it that may
still be picked (not in ``exclude``). Top-down from the highest level, a parent's quota Q is
split over its children of capacities c_i by water-filling: the largest integer cap x with
sum(min(x, c_i)) <= Q (exact, from the sorted capacities), every child gets min(x, c_i), and
the remainder r = Q - sum(min(x, c_i)) (< the number of children above x) gives one more to r
of the children above the cap, drawn with the seed. So small clusters are taken whole and no
cluster gets more than x + 1 while another one was left below its capacity. The root's quota
is the target, the children of level t's clusters are level t-1's clusters, and level 1's
children are the embeddings themselves, each of capacity ``max_repeat``: a level-1 cluster of
s available images with quota q gives each image q // s copies and one more to q % s of them,
drawn at random (``strategy="random"``) or the closest to the centroid (``"closest"``).

``exclude``: images picked already (DINOv2's retrieval). They are not in the pool: they count
neither toward the cluster sizes nor the target, so the caller passes the remaining target.
A target above the pool's capacity takes every available image ``max_repeat`` times (the
returned info says ``took_everything``): not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pipeline.stages.cluster import Level, check_levels

log = logging.getLogger(__name__)

STRATEGIES = ("random", "closest")


def check_balance_config(cfg) -> None:
    """Raise ValueError naming the first balance setting outside its range."""
    if cfg.target_size < 1:
        raise ValueError(f"curate.target_size must be >= 1, got {cfg.target_size}")
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"curate.strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    if cfg.max_repeat < 1:
        raise ValueError(f"curate.max_repeat must be >= 1, got {cfg.max_repeat}")
    if cfg.seed < 0:
        raise ValueError(f"curate.seed must be >= 0, got {cfg.seed}")


def split_quota(
    capacity: np.ndarray, group: np.ndarray, quota: np.ndarray,
    rng: np.random.Generator | None = None, key: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(int64 quota per child, int64 cap x per group): every group's ``quota`` split over its
    children (``group[i]`` = parent of child i, capacity ``capacity[i]``) by water-filling
    (module docstring). The remainder goes to the children above the cap with the smallest
    ``key`` (default: random keys from ``rng``). A group whose quota exceeds its children's
    total gets that total (cap = its largest capacity)."""
    capacity = np.asarray(capacity, np.int64)
    group = np.asarray(group, np.int64)
    quota = np.asarray(quota, np.int64)
    n, n_groups = len(capacity), len(quota)
    order = np.lexsort((capacity, group))  # by group, then capacity (stable: then by index)
    c, g = capacity[order], group[order]
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    before = np.cumsum(c) - c  # sum of the capacities before each child (whole array)
    base = np.concatenate([before, [before[-1] + c[-1] if n else 0]])
    j = np.arange(n) - starts[g]  # position in the group, ascending capacity
    # sum(min(c_j, c_i)) over the group: the children before j whole, c_j for the others
    fill = (before - base[starts[g]]) + c * (counts[g] - j)
    full = fill <= quota[g]  # capacity c_j fits under the quota: child j is taken whole
    n_full = np.bincount(g[full], minlength=n_groups)
    rest = counts - n_full  # children above the cap
    full_sum = base[starts + n_full] - base[starts]
    cap = np.where(rest > 0, (quota - full_sum) // np.maximum(rest, 1), 0)
    remainder = np.where(rest > 0, quota - full_sum - cap * rest, 0)
    out = np.where(full, c, cap[g])
    above = np.nonzero(~full)[0]
    if len(above):
        if key is None:
            k = (rng or np.random.default_rng(0)).random(len(above))
        else:
            k = np.asarray(key)[order][above]
        by = np.lexsort((k, g[above]))
        ga = g[above][by]
        rank = np.arange(len(by)) - np.searchsorted(ga, ga, side="left")
        out[above[by[rank < remainder[ga]]]] += 1
    quotas = np.empty(n, np.int64)
    quotas[order] = out
    if n:
        largest = np.zeros(n_groups, np.int64)
        np.maximum.at(largest, group, capacity)
        cap = np.where(rest > 0, cap, largest)
    return quotas, cap


def available_mask(n: int, exclude) -> np.ndarray:
    """bool [n]: the embeddings that may be picked; ``exclude``: indices or a bool mask."""
    mask = np.ones(n, np.bool_)
    if exclude is None:
        return mask
    exclude = np.asarray(exclude)
    if exclude.dtype == np.bool_:
        if exclude.shape != (n,):
            raise ValueError(f"exclude: a mask needs shape ({n},), got {exclude.shape}")
        return ~exclude
    exclude = exclude.astype(np.int64, casting="safe").reshape(-1)
    if len(exclude) and (exclude.min() < 0 or exclude.max() >= n):
        raise ValueError(f"exclude: indices must be in [0, {n})")
    mask[exclude] = False
    return mask


def capacities(levels: Sequence[Level], available: np.ndarray, max_repeat: int) -> list:
    """int64 capacity of every cluster at every level (index t-1 for level t): max_repeat
    times its available embeddings."""
    caps = [np.bincount(levels[0].assignment[available], minlength=levels[0].k) * max_repeat]
    for lv in levels[1:]:
        caps.append(np.bincount(lv.assignment, weights=caps[-1], minlength=lv.k))
    return [np.rint(cap).astype(np.int64) for cap in caps]


def balanced_sample(
    levels: Sequence[Level], target: int, cfg, exclude=None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(int64 sorted indices of the selected embeddings, int32 multiplicity of each, info):
    ``target`` selections in all (sum of the multiplicities), balanced top-down over the
    ``levels`` of ``hierarchical_kmeans`` (module docstring). ``exclude``: embeddings not to
    pick (indices or bool mask). Deterministic for a ``cfg.seed``."""
    check_balance_config(cfg)
    if target < 1:
        raise ValueError(f"curate.target_size (target) must be >= 1, got {target}")
    n = check_levels(levels)
    available = available_mask(n, exclude)
    caps = capacities(levels, available, int(cfg.max_repeat))
    total = int(caps[-1].sum())
    rng = np.random.default_rng(int(cfg.seed))
    quota, top_cap = split_quota(
        caps[-1], np.zeros(levels[-1].k, np.int64), [min(target, total)], rng
    )
    for t in range(len(levels) - 2, -1, -1):  # level t+1's quotas from level t+2's
        quota, _ = split_quota(caps[t], levels[t + 1].assignment, quota, rng)
    point_cap = np.where(available, int(cfg.max_repeat), 0)
    key = levels[0].distances if cfg.strategy == "closest" else None
    mult, _ = split_quota(point_cap, levels[0].assignment, quota, rng, key)
    indices = np.nonzero(mult)[0].astype(np.int64)
    multiplicity = mult[indices].astype(np.int32)
    info = {
        "target": int(target),
        "selected": int(multiplicity.sum()),
        "images": len(indices),
        "available": int(available.sum()),
        "excluded": int(n - available.sum()),
        "capacity": total,
        "took_everything": target >= total,
        "top_level_cap": int(top_cap[0]) if len(top_cap) else 0,
        "strategy": cfg.strategy,
        "max_repeat": int(cfg.max_repeat),
    }
    if info["took_everything"]:
        log.warning("balanced sampling: target %d >= the pool's capacity %d (%d images x "
                    "max_repeat %d): every image taken", target, total, info["available"],
                    cfg.max_repeat)  # fmt: skip
    return indices, multiplicity, info
