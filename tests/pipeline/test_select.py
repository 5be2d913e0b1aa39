"""Selection functions without Ray: sample-based retrieval (flat exact against brute force,
IVF and IVF-PQ recall), cluster-based retrieval, balance figures."""

from __future__ import annotations

import numpy as np

from pipeline.config import CurateConfig, SemDedupConfig
from pipeline.stages.curate import balance_report, cluster_based, sample_based
from pipeline.stages.semdedup import build_index


def _pool(n=12000, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, dim)).astype(np.float32)
    x = centres[rng.integers(0, 60, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    seeds = x[rng.choice(n, 200, replace=False)] + 0.05 * rng.standard_normal((200, dim))
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    return x.astype(np.float16), seeds.astype(np.float32)


def test_sample_based_flat_is_exact_with_collisions():
    pool, seeds = _pool()
    index = build_index([pool], SemDedupConfig(index="flat"), len(pool))
    rows, seed_rows, sims, collisions = sample_based(index, seeds, 4)
    sims_all = seeds @ pool.astype(np.float32).T
    top = np.argsort(-sims_all, axis=1, kind="stable")[:, :4]
    assert set(rows.tolist()) == set(top.reshape(-1).tolist())
    assert collisions == top.size - len(set(top.reshape(-1).tolist()))
    for r, s, c in zip(rows[:50], seed_rows[:50], sims[:50]):
        holders = [q for q in range(len(seeds)) if r in top[q]]
        assert s == max(holders, key=lambda q: sims_all[q, r])  # the closest of its seeds
        np.testing.assert_allclose(c, sims_all[s, r], atol=1e-3)


def test_ivf_and_ivfpq_recall_against_flat():
    pool, seeds = _pool()
    flat = build_index([pool], SemDedupConfig(index="flat"), len(pool))
    exact = set(sample_based(flat, seeds, 4)[0].tolist())
    ivf = build_index([pool], SemDedupConfig(index="ivf", ivf_nprobe=16), len(pool))
    got = set(sample_based(ivf, seeds, 4)[0].tolist())
    assert len(got & exact) / len(exact) >= 0.95
    pq = build_index([pool], SemDedupConfig(index="ivf", ivf_nprobe=16, pq_m=8), len(pool))
    rows, seed_rows, sims, _ = sample_based(pq, seeds, 4, exact_parts=[pool])
    assert len(set(rows.tolist()) & exact) / len(exact) >= 0.95  # refined: 8 x 4 candidates
    truth = (seeds[seed_rows] * pool[rows].astype(np.float32)).sum(axis=1)
    np.testing.assert_allclose(sims, truth, atol=1e-4)  # re-scored exactly, not PQ-biased


def test_cluster_based_takes_whole_clusters_closest_first_and_caps():
    labels = np.array([0] * 10 + [1] * 6 + [2] * 4)
    distances = np.arange(20, dtype=np.float32)[::-1] / 20
    seeds = np.array([0] * 5 + [1] * 4 + [2] * 3)  # clusters 0 and 1 hold more than 3 seeds
    cfg = CurateConfig(per_cluster=3, min_seeds_per_cluster=3, max_per_seed_set=100)
    rows, clusters, info = cluster_based(seeds, labels, distances, cfg)
    assert rows.tolist() == [9, 8, 7, 15, 14, 13]  # closest to the centroid first, 3 each
    assert clusters.tolist() == [0, 0, 0, 1, 1, 1] and info["clusters_taken"] == 2
    capped = CurateConfig(per_cluster=3, min_seeds_per_cluster=3, max_per_seed_set=4)
    rows, _, info = cluster_based(seeds, labels, distances, capped)
    assert len(rows) == 4 and info["capped"]


def test_balance_report():
    report = balance_report(np.array([0, 0, 0, 1, 2, 2]))
    assert report["clusters"] == 3 and report["min"] == 1 and report["max"] == 3
    assert 0 < report["normalised_entropy"] < 1
    assert balance_report(np.array([0, 1, 2]))["normalised_entropy"] == 1.0
