"""Hierarchical spherical k-means with resampling on Gaussian blobs: real FAISS, no Ray."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.stages import cluster as cl

SIZES = [2000, 500, 50, 30, 20, 10, 10]  # very unequal blobs on the 32-d sphere
DIM = 32


def blobs(sizes=SIZES, dim=DIM, spread=0.5, seed=0):
    """(unit float32 points, blob of each point, unit blob centres): cosine to the centre
    about 0.9, centres nearly orthogonal."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    blob = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[blob] + rng.standard_normal((len(blob), dim)) * spread / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), blob, centres.astype(np.float32)


def config(**overrides) -> cl.ClusterConfig:
    base = cl.ClusterConfig(
        levels=[24, 6, 2], resampling_steps=[1, 3, 3], sample_sizes=[0, 0, 0], use_gpu=False
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def data():
    return blobs()


@pytest.fixture()
def mmap_parts(data, tmp_path):
    """The blobs as float16 .npy parts, memory-mapped, as the embed stage stores them."""
    x = data[0]
    bounds = [0, 1000, 2100, len(x)]
    parts = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(tmp_path / f"{i}.npy", x[a:b].astype(np.float16))
        parts.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    return parts


def check_nearest(inputs, lv: cl.Level) -> None:
    sims = inputs @ lv.centroids.T
    best = sims.max(1)
    mine = sims[np.arange(len(inputs)), lv.assignment]
    assert np.all(mine >= best - 1e-5)  # near-ties aside, argmax of the dot products
    assert np.mean(lv.assignment == sims.argmax(1)) > 0.999
    np.testing.assert_allclose(lv.distances, 1 - mine, atol=1e-5)
    assert lv.assignment.dtype == np.int64 and lv.distances.dtype == np.float32


def test_every_level_assigns_its_inputs_to_the_nearest_centroid(mmap_parts):
    cfg = config(assign_chunk=700)
    levels = cl.hierarchical_kmeans(mmap_parts, cfg)
    x = np.concatenate([np.asarray(p, np.float32) for p in mmap_parts])
    assert [lv.k for lv in levels] == cfg.levels
    inputs = x
    for lv in levels:
        assert lv.centroids.shape == (lv.k, DIM) and lv.centroids.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(lv.centroids, axis=1), 1, atol=1e-5)
        assert len(lv.assignment) == len(inputs)
        check_nearest(inputs, lv)
        inputs = lv.centroids
    top = cl.labels_at(levels, 3)
    assert np.array_equal(top, levels[2].assignment[levels[1].assignment[levels[0].assignment]])
    assert np.array_equal(cl.labels_at(levels, 1), levels[0].assignment)
    assert cl.check_levels(levels) == len(x)


def coverage(centroids, centres):
    """(centroids in the biggest blob, entropy of the centroids' spread over the blobs)."""
    counts = np.bincount((centroids @ centres.T).argmax(1), minlength=len(centres))
    p = counts[counts > 0] / counts.sum()
    return counts[0], float(-(p * np.log(p)).sum())


def test_resampling_spreads_centroids_over_the_blobs(data):
    x, _, centres = data
    big, entropy = {}, {}
    for steps in (0, 3):
        runs = [
            coverage(cl.train_level(x, 14, config(levels=[14], resampling_steps=[steps],
                                                  sample_sizes=[0], seed=seed), 1), centres)
            for seed in range(3)
        ]  # fmt: skip
        big[steps] = np.mean([r[0] for r in runs])
        entropy[steps] = np.mean([r[1] for r in runs])
    # The 2000-point blob holds 76% of the points: plain k-means gives it about half of the 14
    # centroids (7-8), three resampling steps 1-2; the others move to the small blobs.
    assert big[3] <= 0.5 * big[0], big
    assert entropy[3] > entropy[0] + 0.1, entropy


@pytest.mark.parametrize("init", ["faiss", "kmeans++"])
def test_sampled_fit_and_chunked_assign_equal_a_plain_faiss_run(data, mmap_parts, init):
    import faiss

    cfg = config(levels=[16], resampling_steps=[0], sample_sizes=[0], init=init,
                 max_points_per_centroid=40, assign_chunk=333, seed=7)  # fmt: skip
    sample = cl.training_sample(mmap_parts, 16, cfg, 1)
    assert sample.shape == (16 * 40, DIM) and sample.dtype == np.float32
    x = np.concatenate([np.asarray(p, np.float32) for p in mmap_parts])
    rows = np.nonzero((x[:, None, :] == sample[None, :, :]).all(-1))[0]  # sample rows of x
    assert len(np.unique(rows)) == len(sample) and np.all(np.diff(rows) > 0)
    assert np.array_equal(sample, cl.training_sample(mmap_parts, 16, cfg, 1))
    other = cl.training_sample(mmap_parts, 16, dataclasses.replace(cfg, seed=8), 1)
    assert not np.array_equal(sample, other)

    km = faiss.Kmeans(DIM, 16, niter=cfg.iterations, spherical=True, seed=cfg.seed)
    init_centroids = cl.kmeans_plus_plus(sample, 16, cfg.seed) if init == "kmeans++" else None
    km.train(sample, init_centroids=init_centroids)
    ref_sims, ref_labels = km.index.search(x, 1)

    centroids = cl.train_level(sample, 16, cfg, 1)
    np.testing.assert_allclose(centroids, km.centroids, atol=1e-6)
    labels, distances = cl.assign_parts(centroids, mmap_parts, cfg.assign_chunk)
    assert np.array_equal(labels, ref_labels[:, 0])
    np.testing.assert_allclose(distances, 1 - ref_sims[:, 0], atol=1e-5)
    one = cl.assign(centroids, x[100:400])
    assert np.array_equal(one[0], labels[100:400])

    (level,) = cl.hierarchical_kmeans(mmap_parts, cfg)
    np.testing.assert_array_equal(level.centroids, centroids)
    assert np.array_equal(level.assignment, labels)


def test_kmeans_plus_plus_picks_distinct_spread_rows():
    x, blob, _ = blobs([200] * 8, spread=0.2)  # within a blob D^2 ~ 0.08, between ~ 2
    seeds = cl.kmeans_plus_plus(x, 8, seed=3)
    hits = np.nonzero((x[:, None, :] == seeds[None]).all(-1))[0]
    assert len(np.unique(hits)) == 8
    assert len(np.unique(blob[hits])) >= 7  # uniform seeds would cover about 5.2 blobs
    dup = np.repeat(x[:3], 10, axis=0)  # 3 distinct points, 5 seeds wanted
    assert cl.kmeans_plus_plus(dup, 5, seed=0).shape == (5, DIM)


def test_sample_size_rule():
    cfg = config(levels=[10], resampling_steps=[1], sample_sizes=[0])
    assert cl.sample_size(cfg, 1, 1000, 10) == 50
    assert cl.sample_size(cfg, 1, 15, 10) == 1
    assert cl.sample_size(dataclasses.replace(cfg, sample_sizes=[7]), 1, 1000, 10) == 7
    assert cl.training_size(10**6, 1000, cfg) == 256_000


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(levels=[]), "cluster.levels"),
        (dict(levels=[10, 10, 2]), "cluster.levels"),
        (dict(levels=[10, 20, 2]), "cluster.levels"),
        (dict(levels=[10, 5, 0]), r"cluster.levels\[2\]"),
        (dict(resampling_steps=[1, 1]), "cluster.resampling_steps"),
        (dict(sample_sizes=[1, 1, 1, 1]), "cluster.sample_sizes"),
        (dict(sample_sizes=[1, -1, 1]), r"cluster.sample_sizes\[1\]"),
        (dict(init="random"), "cluster.init"),
        (dict(iterations=0), "cluster.iterations"),
        (dict(max_points_per_centroid=0), "cluster.max_points_per_centroid"),
        (dict(assign_chunk=0), "cluster.assign_chunk"),
        (dict(seed=-1), "cluster.seed"),
    ],
)
def test_bad_config_names_the_key(data, overrides, key):
    with pytest.raises(ValueError, match=key):
        cl.hierarchical_kmeans(data[0], config(**overrides))


def test_bad_inputs_name_the_problem(data):
    x = data[0]
    with pytest.raises(ValueError, match=r"cluster.levels\[0\]=24 exceeds the 20 embeddings"):
        cl.hierarchical_kmeans(x[:20], config())
    with pytest.raises(ValueError, match="L2-normalised"):
        cl.hierarchical_kmeans(x * 2, config())
    with pytest.raises(ValueError, match="L2-normalised"):
        one = config(levels=[10], resampling_steps=[0], sample_sizes=[0])
        cl.train_level(np.vstack([x[:100], 3 * x[100:200]]), 10, one, 1)
    with pytest.raises(ValueError, match=r"cluster.levels\[1\]=30 exceeds the 20 points"):
        cl.train_level(x[:20], 30, config(levels=[40, 30], resampling_steps=[0, 0],
                                          sample_sizes=[0, 0]), 2)  # fmt: skip
    with pytest.raises(ValueError, match="2-D"):
        cl.hierarchical_kmeans([x[:100], x[100:200, :16]], config())
    levels = cl.hierarchical_kmeans(x, config(levels=[8], resampling_steps=[0], sample_sizes=[0]))
    with pytest.raises(ValueError, match="level must be"):
        cl.labels_at(levels, 2)
    broken = [levels[0], cl.Level(levels[0].centroids[:2], np.zeros(5, np.int64), np.zeros(5))]
    with pytest.raises(ValueError, match=r"levels\[1\]"):
        cl.check_levels(broken)
