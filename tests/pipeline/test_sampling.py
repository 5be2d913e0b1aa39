"""Balanced hierarchical sampling: exact target, per-level caps, strategies, repeats, exclusion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import CurateConfig
from pipeline.stages import cluster as cl
from pipeline.stages import sampling as sp


def blobs(sizes=(2000, 500, 50, 30, 20, 10, 10), dim=32, spread=0.5, seed=0) -> np.ndarray:
    """Unit float32 points in Gaussian blobs of very unequal sizes on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    blob = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[blob] / np.linalg.norm(centres[blob], axis=1, keepdims=True)
    x = x + rng.standard_normal(x.shape) * spread / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def config(**overrides) -> CurateConfig:
    return dataclasses.replace(CurateConfig(target_size=100, seed=0), **overrides)


@pytest.fixture(scope="module")
def levels():
    """Three levels (24, 6, 2 clusters) of real k-means over very unequal blobs."""
    x = blobs()
    cfg = cl.ClusterConfig(levels=[24, 6, 2], resampling_steps=[1, 3, 3], sample_sizes=[0, 0, 0],
                           use_gpu=False)  # fmt: skip
    return cl.hierarchical_kmeans(x, cfg)


def flat_levels(sizes, groups=None, seed=0) -> list[cl.Level]:
    """Hand-made levels: level-1 clusters of the given sizes (embeddings in order, distances
    random), optionally a level 2 grouping them (``groups[i]`` = parent of cluster i)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    first = cl.Level(np.zeros((len(sizes), 4), np.float32),
                     np.repeat(np.arange(len(sizes)), sizes).astype(np.int64),
                     rng.random(n).astype(np.float32))  # fmt: skip
    out = [first]
    if groups is not None:
        k = max(groups) + 1
        out.append(cl.Level(np.zeros((k, 4), np.float32), np.asarray(groups, np.int64),
                            np.zeros(len(groups), np.float32)))  # fmt: skip
    return out


def level_quotas(levels, mult, indices) -> list[np.ndarray]:
    """Selections per cluster at every level, from the per-image multiplicities."""
    q = np.bincount(levels[0].assignment[indices], weights=mult, minlength=levels[0].k)
    out = [q.astype(np.int64)]
    for lv in levels[1:]:
        out.append(np.bincount(lv.assignment, weights=out[-1], minlength=lv.k).astype(np.int64))
    return out


def check_caps(quota, capacity, parent) -> None:
    """Water-filling in every parent: a child left below its capacity has at least the quota
    of any sibling minus one (no cluster passes the cap while another could take more)."""
    for p in np.unique(parent):
        kids = parent == p
        q, c = quota[kids], capacity[kids]
        assert np.all(q <= c)
        short = q < c
        if short.any():
            assert q.max() <= q[short].min() + 1, (p, q, c)


def check_sample(levels, indices, mult, target, max_repeat=1, available=None):
    n = len(levels[0].assignment)
    available = np.ones(n, bool) if available is None else available
    assert indices.dtype == np.int64 and mult.dtype == np.int32
    assert np.all(np.diff(indices) > 0) and np.all(mult >= 1) and np.all(mult <= max_repeat)
    assert available[indices].all()
    assert int(mult.sum()) == target
    caps = sp.capacities(levels, available, max_repeat)
    quotas = level_quotas(levels, mult, indices)
    point_mult = np.zeros(n, np.int64)
    point_mult[indices] = mult
    check_caps(point_mult, np.where(available, max_repeat, 0), levels[0].assignment)
    for t in range(len(levels)):
        parent = levels[t + 1].assignment if t + 1 < len(levels) else np.zeros(levels[t].k)
        check_caps(quotas[t], caps[t], parent)


@pytest.mark.parametrize("target", [1, 7, 100, 1234, 2619])
def test_exact_target_and_caps_at_every_level(levels, target):
    indices, mult, info = sp.balanced_sample(levels, target, config())
    check_sample(levels, indices, mult, target)
    assert info["selected"] == target and not info["took_everything"]


def test_small_clusters_are_taken_whole():
    levels = flat_levels([1000, 100, 5, 3])
    indices, mult, info = sp.balanced_sample(levels, 50, config())
    assert list(level_quotas(levels, mult, indices)[0]) == [21, 21, 5, 3]
    assert info["top_level_cap"] == 21
    levels = flat_levels([1000, 100, 5, 3], groups=[0, 1, 1, 1])  # 1000 | 100 + 5 + 3
    indices, mult, _ = sp.balanced_sample(levels, 50, config())
    q1, q2 = level_quotas(levels, mult, indices)
    assert list(q2) == [25, 25] and list(q1) == [25, 17, 5, 3]


def test_remainder_goes_to_clusters_above_the_cap():
    levels = flat_levels([10, 10, 10, 2])  # 17 = 2 + 3 * 5
    indices, mult, _ = sp.balanced_sample(levels, 18, config())
    assert sorted(level_quotas(levels, mult, indices)[0]) == [2, 5, 5, 6]


def test_deterministic_with_a_seed_different_with_another(levels):
    a = sp.balanced_sample(levels, 500, config(seed=1))
    b = sp.balanced_sample(levels, 500, config(seed=1))
    c = sp.balanced_sample(levels, 500, config(seed=2))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_max_repeat(levels):
    n = len(levels[0].assignment)
    target = 3 * n - 5
    indices, mult, info = sp.balanced_sample(levels, target, config(max_repeat=3))
    check_sample(levels, indices, mult, target, max_repeat=3)
    assert len(indices) == n and mult.max() == 3 and not info["took_everything"]
    indices, mult, _ = sp.balanced_sample(levels, 1000, config(max_repeat=4))
    check_sample(levels, indices, mult, 1000, max_repeat=4)
    # repeats only in level-1 clusters whose quota exceeds their size, and there every image
    sizes = np.bincount(levels[0].assignment, minlength=levels[0].k)
    quota = level_quotas(levels, mult, indices)[0]
    repeated = np.unique(levels[0].assignment[indices[mult > 1]])
    assert len(repeated) and np.all(quota[repeated] > sizes[repeated])
    for c in repeated:
        assert np.sum(levels[0].assignment[indices] == c) == sizes[c]


def test_closest_takes_the_points_nearest_the_centroid(levels):
    indices, mult, _ = sp.balanced_sample(levels, 300, config(strategy="closest"))
    check_sample(levels, indices, mult, 300)
    lv = levels[0]
    picked = np.zeros(len(lv.assignment), bool)
    picked[indices] = True
    partial = 0
    for c in range(lv.k):
        members = lv.assignment == c
        taken, left = lv.distances[members & picked], lv.distances[members & ~picked]
        if len(taken) and len(left):
            partial += 1
            assert taken.max() <= left.min()
    assert partial >= 3


def test_exclude_removes_images_from_the_pool(levels):
    n = len(levels[0].assignment)
    rng = np.random.default_rng(0)
    exclude = rng.choice(n, 400, replace=False)
    available = np.ones(n, bool)
    available[exclude] = False
    for how in (exclude, ~available):
        indices, mult, info = sp.balanced_sample(levels, 700, config(), exclude=how)
        check_sample(levels, indices, mult, 700, available=available)
        assert info["excluded"] == 400 and info["available"] == n - 400
    small = flat_levels([100, 100, 10])
    indices, mult, _ = sp.balanced_sample(small, 30, config(), exclude=np.arange(200, 210))
    assert list(level_quotas(small, mult, indices)[0]) == [15, 15, 0]  # sizes 100, 100, 0


def test_target_above_the_pool_takes_everything(levels):
    n = len(levels[0].assignment)
    indices, mult, info = sp.balanced_sample(levels, 2 * n + 1, config(max_repeat=2))
    assert len(indices) == n and np.all(mult == 2)
    assert info["took_everything"] and info["selected"] == 2 * n and info["capacity"] == 2 * n


def test_split_quota_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, groups = rng.integers(1, 40), rng.integers(1, 6)
        capacity = rng.integers(0, 20, n) * rng.integers(0, 2, n)
        group = rng.integers(0, groups, n)
        totals = np.bincount(group, weights=capacity, minlength=groups).astype(np.int64)
        quota = (rng.random(groups) * (totals + 1)).astype(np.int64)
        got, cap = sp.split_quota(capacity, group, quota, rng)
        for g in range(groups):
            c, q = capacity[group == g], got[group == g]
            assert q.sum() == quota[g] and np.all(q <= c)
            if totals[g] > quota[g]:
                x = max(x for x in range(0, 21) if np.minimum(x, c).sum() <= quota[g])
                assert cap[g] == x
                assert np.all(q >= np.minimum(x, c)) and np.all(q <= np.minimum(x + 1, c))


@pytest.mark.parametrize(
    "overrides, target, key",
    [
        (dict(), 0, "target"),
        (dict(), -3, "target"),
        (dict(target_size=0), 10, "curate.target_size"),
        (dict(strategy="nearest"), 10, "curate.strategy"),
        (dict(max_repeat=0), 10, "curate.max_repeat"),
        (dict(seed=-1), 10, "curate.seed"),
    ],
)
def test_bad_config_names_the_key(levels, overrides, target, key):
    with pytest.raises(ValueError, match=key):
        sp.balanced_sample(levels, target, config(**overrides))


def test_bad_levels_and_exclude(levels):
    n = len(levels[0].assignment)
    with pytest.raises(ValueError, match="exclude"):
        sp.balanced_sample(levels, 10, config(), exclude=[n])
    with pytest.raises(ValueError, match="exclude"):
        sp.balanced_sample(levels, 10, config(), exclude=np.zeros(5, bool))
    with pytest.raises(ValueError, match=r"levels\[1\]"):
        sp.balanced_sample([levels[0], levels[2]], 10, config())
    with pytest.raises(ValueError, match="levels"):
        sp.balanced_sample([], 10, config())
