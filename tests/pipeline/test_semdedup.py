"""Semantic dedup and decontamination on synthetic embeddings: real FAISS, no Ray, no model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import SemDedupConfig
from pipeline.layout import SEMANTIC_SCHEMA
from pipeline.stages import semdedup as sd

THRESHOLD = 0.9


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin-wait: on a busy 2-core machine, k-means with 2 threads ran
    8x slower than with 1. These pools are small; one thread keeps the tests at seconds."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def config(**overrides) -> SemDedupConfig:
    return dataclasses.replace(
        SemDedupConfig(k=16, threshold=THRESHOLD, use_gpu=False), **overrides
    )


def make_pool(n: int = 2000, dim: int = 64, seed: int = 0):
    """Random unit vectors (cosine ~ N(0, 1/dim): far below 0.9) with planted copies.

    Returns (embeddings, keys, areas, groups): groups are lists of rows that must end up in
    one component each; every other row must stay alone."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, dim)))
    groups, row = [], 0
    for size in [2, 3, 4, 5] * 8:  # 32 groups of near copies around their first row
        members = list(range(row, row + size))
        noise = rng.standard_normal((size - 1, dim)) * 0.2 / np.sqrt(dim)  # cosine ~0.98
        x[members[1:]] = unit(x[members[0]] + noise)
        groups.append(members)
        row += size
    for _ in range(4):  # chains a~b, b~c, a !~ c: cos(a, b) = cos(b, c) = 0.94, cos(a, c) = 0.77
        u, v = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T
        theta = np.arccos(0.94)
        x[row : row + 3] = [
            u,
            np.cos(theta) * u + np.sin(theta) * v,
            np.cos(2 * theta) * u + np.sin(2 * theta) * v,
        ]
        groups.append([row, row + 1, row + 2])
        row += 3
    keys = [f"{i:06d}" for i in rng.permutation(n)]
    areas = rng.integers(1, 10, n).astype(np.int64) * 10_000
    return x, keys, areas, groups


def expected_survivor(group, keys, areas) -> int:
    return min(group, key=lambda r: (-areas[r], keys[r]))


def brute_force_pairs(x: np.ndarray, k: int, threshold: float) -> set[tuple[int, int]]:
    """(i, j) with j among i's k nearest (i itself included), j != i, cosine > threshold."""
    pairs = set()
    for s in range(0, len(x), 1000):
        sims = x[s : s + 1000] @ x.T
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]  # the k-th largest of each row
        i, j = np.nonzero((sims > threshold) & (sims >= kth[:, None]))
        pairs |= {(a + s, b) for a, b in zip(i.tolist(), j.tolist()) if a + s != b}
    return pairs


def edge_set(rows, cols) -> set[tuple[int, int]]:
    return set(zip(rows.tolist(), cols.tolist()))


def verdicts(table) -> dict[str, tuple]:
    d = table.to_pydict()
    return {k: (dup, r) for k, dup, r in zip(d["key"], d["duplicate_of"], d["reason"])}


# -- semantic dedup ---------------------------------------------------------------------------


def test_planted_groups_collapse_to_their_best_member():
    x, keys, areas, groups = make_pool()
    areas[groups[1]] = 50_000  # a tie on area: the smallest key wins
    table, summary = sd.semantic_dedup([x], keys, areas, config())
    assert table.schema == SEMANTIC_SCHEMA and table.num_rows == len(x)
    d = table.to_pydict()
    planted = {r for g in groups for r in g}
    for group in groups:
        best = expected_survivor(group, keys, areas)
        assert d["reason"][best] is None and d["duplicate_of"][best] is None
        assert len({d["component"][r] for r in group}) == 1
        for r in set(group) - {best}:
            assert (d["reason"][r], d["duplicate_of"][r]) == ("semantic", keys[best])
            assert d["similarity"][r] == pytest.approx(float(x[r] @ x[best]), abs=1e-5)
    for r in set(range(len(x))) - planted:  # distinct vectors stay, alone
        assert d["reason"][r] is None and d["similarity"][r] is None
    chain = groups[-1]
    assert float(x[chain[0]] @ x[chain[2]]) < THRESHOLD  # joined only through the middle one
    n_dups = sum(len(g) - 1 for g in groups)
    assert summary["semantic_duplicates"] == n_dups and summary["kept"] == len(x) - n_dups
    assert summary["components_with_duplicates"] == len(groups)
    assert summary["largest_component"] == 5 and summary["index"] == "flat"
    assert summary["eval_contaminated"] == 0


def test_survivors_do_not_depend_on_input_order():
    x, keys, areas, _ = make_pool()
    base = verdicts(sd.semantic_dedup([x], keys, areas, config())[0])
    perm = np.random.default_rng(5).permutation(len(x))
    shuffled = sd.semantic_dedup([x[perm]], [keys[i] for i in perm], areas[perm], config())[0]
    assert verdicts(shuffled) == base


def test_pick_survivors_ties_by_smallest_key():
    labels = np.array([0, 1, 0, 0, 1, 2])
    keys = ["d", "x", "b", "c", "a", "z"]
    areas = np.array([9, 1, 9, 3, 1, 0])
    assert sd.pick_survivors(labels, keys, areas).tolist() == [2, 4, 2, 2, 4, 5]


def test_components_are_undirected_chains():
    labels = sd.components(6, np.array([0, 2, 4]), np.array([1, 1, 5]))
    assert labels[0] == labels[1] == labels[2] != labels[3] and labels[4] == labels[5]


@pytest.mark.parametrize("index", ["flat", "ivf", "imi"])
def test_index_edges_equal_brute_force(index):
    x, _, _, _ = make_pool()
    # IVF and IMI probing every list: exact
    cfg = config(index=index, ivf_nlist=16, imi_bits=2, ivf_nprobe=16)
    built = sd.build_index([x], cfg, len(x))
    rows, cols, sims = sd.search_all(built, [x], cfg.k, THRESHOLD, cfg.query_chunk)
    assert rows.dtype == cols.dtype == np.int64 and sims.dtype == np.float32
    assert (sims > THRESHOLD).all() and (rows != cols).all()
    assert edge_set(rows, cols) == brute_force_pairs(x, cfg.k, THRESHOLD)


def test_ivf_with_few_probes_keeps_recall():
    x, _, _, _ = make_pool(n=4000)
    cfg = config(index="ivf", ivf_nlist=64, ivf_nprobe=8)
    built = sd.build_index([x], cfg, len(x))
    assert built.nprobe == 8 and built.nlist == 64
    rows, cols, _ = sd.search_all(built, [x], cfg.k, THRESHOLD, cfg.query_chunk)
    truth = brute_force_pairs(x, cfg.k, THRESHOLD)
    assert len(edge_set(rows, cols) & truth) >= 0.95 * len(truth)
    assert edge_set(rows, cols) <= truth


def test_ivf_sizes_its_lists_from_the_pool():
    x, keys, areas, groups = make_pool(n=10_000)
    cfg = config(index="ivf", ivf_nprobe=64)
    _, summary = sd.semantic_dedup([x], keys, areas, cfg)
    assert summary["index"] == "ivf"
    assert summary["nlist"] == 10_000 // 39  # 4 sqrt(n) = 400 lists, capped at 39 points each
    assert summary["components_with_duplicates"] == len(groups)


def test_auto_picks_the_multi_index_at_the_size_threshold_on_cpu():
    """Above ivf_min_size, auto builds IVF over an inverted multi-index (no GPU here): about one
    list per 64 rows, the planted groups found exactly as the flat index finds them."""
    x, keys, areas, groups = make_pool(n=10_000)
    flat, _ = sd.semantic_dedup([x], keys, areas, config())
    table, summary = sd.semantic_dedup([x], keys, areas, config(ivf_min_size=10_000))
    assert summary["index"] == "imi" and sd.index_kind(config(), 10_000) == "flat"
    assert summary["nlist"] == 4**4  # ceil(log2(10,000 / 64) / 2) = 4 bits a half: 256 lists
    assert sd.index_kind(config(ivf_min_size=10_000, pq_m=8), 10_000) == "ivfpq"
    assert summary["components_with_duplicates"] == len(groups)
    assert verdicts(table) == verdicts(flat)


def test_multi_index_needs_an_even_dimension():
    x = unit(np.random.default_rng(0).standard_normal((500, 33)))
    with pytest.raises(ValueError, match="dimension 33 is odd"):
        sd.build_index([x], config(index="imi"), len(x))


def test_ivf_pq_rescores_neighbours_exactly():
    """PQ similarities are rough (4 bytes per 64-d random vector here) and biased low; the
    neighbours they rank are re-scored from the embeddings: edges are exact, recall high."""
    x, keys, areas, groups = make_pool(n=10_000)
    captured = []

    def search(index, parts, k, threshold, rescore=False):
        assert rescore  # IVF-PQ asks for exact re-scoring
        captured.append(sd.search_all(index, parts, k, threshold, 4096, rescore))
        return captured[-1]

    cfg = config(index="ivf", pq_m=4, ivf_nprobe=64)
    _, summary = sd.semantic_dedup([x], keys, areas, cfg, search=search)
    assert summary["index"] == "ivfpq"
    rows, cols, sims = captured[0]
    np.testing.assert_allclose(sims, np.einsum("ij,ij->i", x[rows], x[cols]), atol=1e-5)
    truth = brute_force_pairs(x, cfg.k, THRESHOLD)
    assert edge_set(rows, cols) <= truth and len(edge_set(rows, cols)) >= 0.95 * len(truth)
    assert summary["components_with_duplicates"] >= 0.95 * len(groups)


@pytest.mark.parametrize("index", ["flat", "imi"])
def test_chunked_search_equals_one_call_and_survives_serialisation(index):
    x, _, _, _ = make_pool()
    cfg = config(index=index)
    built = sd.build_index([x], cfg, len(x))
    whole = sd.search_edges(built, x, 0, cfg.k, THRESHOLD)
    shipped = sd.deserialize_index(sd.serialize_index(built))
    assert sd.serialize_index(built).dtype == np.uint8
    pieces = [
        sd.search_edges(shipped, x[s : s + 300], s, cfg.k, THRESHOLD) for s in range(0, len(x), 300)
    ]
    assert edge_set(*sd.concat_edges(pieces)[:2]) == edge_set(*whole[:2])


def test_memmapped_float16_parts(tmp_path):
    x, keys, areas, _ = make_pool()
    parts = []
    for i, (a, b) in enumerate([(0, 700), (700, 701), (701, 701), (701, 2000)]):  # one empty
        np.save(tmp_path / f"{i}.npy", x[a:b].astype(np.float16))
        parts.append(np.load(tmp_path / f"{i}.npy", mmap_mode="r"))
    table, summary = sd.semantic_dedup(parts, keys, areas, config(query_chunk=256))
    reference, ref_summary = sd.semantic_dedup([x], keys, areas, config())
    assert verdicts(table) == verdicts(reference)
    assert summary["edges"] == ref_summary["edges"]


def test_custom_search_function_is_used():
    x, keys, areas, _ = make_pool()
    calls = []

    def search(index, parts, k, threshold):  # the runner's protocol (no rescore: not PQ)
        calls.append(k)
        blob = sd.serialize_index(index)  # as a Ray task would receive it
        found = [
            sd.search_edges(sd.deserialize_index(blob), q, r, k, threshold, None)
            for r, q in sd.chunks(parts, 500)
        ]
        return sd.concat_edges(found)

    table, _ = sd.semantic_dedup([x], keys, areas, config(), search=search)
    assert calls == [16]
    assert verdicts(table) == verdicts(sd.semantic_dedup([x], keys, areas, config())[0])


# -- decontamination --------------------------------------------------------------------------


def decon_setup():
    """A 256-d pool (random pairs far below 0.45) with planted groups, one of 100 members."""
    x, keys, areas, groups = make_pool(n=2000, dim=256, seed=3)
    rng = np.random.default_rng(4)
    big = list(range(1500, 1600))  # one eval image touches > 64 pool images
    x[big] = unit(x[1500] + rng.standard_normal((100, 256)) * 0.3 / 16)
    touched_groups = [groups[3], big]
    near = [unit(x[g[-1]] + rng.standard_normal(256) * 1.0 / 16) for g in touched_groups]
    evals = np.stack(near + list(unit(rng.standard_normal((30, 256)))))
    return x, keys, areas, touched_groups, evals


@pytest.mark.parametrize(
    "method, index", [("range", "flat"), ("knn", "flat"), ("range", "imi"), ("knn", "imi")]
)
def test_decontamination_drops_exactly_the_touched_components(method, index):
    """On the flat index, and on the multi-index probing all its lists (exact, as flat)."""
    x, keys, areas, touched_groups, evals = decon_setup()
    truth = {int(r) for r in np.nonzero((x @ evals.T > 0.45).any(axis=1))[0]}
    assert truth and truth <= set(touched_groups[0]) | set(touched_groups[1])
    eval_keys = [f"eval-{i}" for i in range(len(evals))]
    table, summary = sd.semantic_dedup(
        [x], keys, areas, config(index=index, imi_bits=2, ivf_nprobe=16),
        eval_parts=[evals[:10], evals[10:]], eval_keys=eval_keys, decon_threshold=0.45,
        eval_method=method,
    )  # fmt: skip
    d = table.to_pydict()
    dropped = {r for r, reason in enumerate(d["reason"]) if reason == "eval"}
    assert dropped == set(touched_groups[0]) | set(touched_groups[1])  # whole components
    for group, eval_key in zip(touched_groups, eval_keys):
        assert {d["duplicate_of"][r] for r in group} == {eval_key}
        best = float((x[group] @ evals[eval_keys.index(eval_key)]).max())
        assert [d["similarity"][r] for r in group] == [pytest.approx(best, abs=1e-5)] * len(group)
    assert summary["eval_contaminated"] == len(dropped) and summary["eval_images"] == len(evals)
    assert summary["eval_pairs"] >= 64 and summary["eval_saturated_queries"] == 0
    semantic = [r for r, reason in enumerate(d["reason"]) if reason == "semantic"]
    assert summary["semantic_duplicates"] == len(semantic) > 0


def test_no_eval_match_drops_nothing():
    x, keys, areas, _, evals = decon_setup()
    table, summary = sd.semantic_dedup([x], keys, areas, config(), eval_parts=[evals[2:]])
    assert summary["eval_contaminated"] == 0 and "eval" not in table.column("reason").to_pylist()


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"threshold": 0.0}, "semdedup.threshold"),
        ({"threshold": 1.5}, "semdedup.threshold"),
        ({"threshold": float("nan")}, "semdedup.threshold"),
        ({"k": 0}, "semdedup.k"),
        ({"index": "hnsw"}, "semdedup.index"),
        ({"ivf_nprobe": 0}, "semdedup.ivf_nprobe"),
        ({"query_chunk": 0}, "semdedup.query_chunk"),
        ({"pq_m": -1}, "semdedup.pq_m"),
    ],
)
def test_bad_config_names_the_key(override, name):
    with pytest.raises(ValueError, match=name):
        sd.check_semdedup_config(config(**override))
    x, keys, areas, _ = make_pool(n=300)
    with pytest.raises(ValueError, match=name):
        sd.semantic_dedup([x], keys, areas, config(**override))


def test_bad_decontamination_threshold():
    from pipeline.config import DecontaminateConfig

    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="decontaminate.threshold"):
            sd.check_decontaminate_config(DecontaminateConfig(sets=[], threshold=bad))
    x, keys, areas, _ = make_pool(n=300)
    with pytest.raises(ValueError, match="decontaminate.threshold"):
        sd.semantic_dedup([x], keys, areas, config(), eval_parts=[x[:3]], decon_threshold=0)


def test_bad_inputs():
    x, keys, areas, _ = make_pool(n=300)
    with pytest.raises(ValueError, match="pool is empty after dedup"):
        sd.semantic_dedup([np.zeros((0, 64), np.float16)], [], np.zeros(0, np.int64), config())
    with pytest.raises(ValueError, match="pool is empty after dedup"):
        sd.semantic_dedup([], [], np.zeros(0, np.int64), config())
    evals = unit(np.ones((2, 32)))
    with pytest.raises(ValueError, match=r"dimension 32.*64"):
        sd.semantic_dedup([x], keys, areas, config(), eval_parts=[evals])
    with pytest.raises(ValueError, match="one dimension"):
        sd.semantic_dedup([x, unit(np.ones((2, 32)))], keys + ["a", "b"], np.ones(302), config())
    with pytest.raises(ValueError, match="L2-normalised"):
        sd.semantic_dedup([x * 2], keys, areas, config())
    with pytest.raises(ValueError, match="keys"):
        sd.semantic_dedup([x], keys[:-1], areas, config())
    with pytest.raises(ValueError, match="pq_m"):
        sd.build_index([x], config(index="ivf", pq_m=7, ivf_min_size=1), 12_000)


def test_knn_fallback_counts_eval_images_beyond_its_cap(monkeypatch):
    """As on a GPU (no range search, k <= GPU_MAX_K): the eval image near the 100-member group
    saturates a cap of 64; its matches still mark that component, and it is counted."""
    x, keys, areas, touched_groups, evals = decon_setup()
    monkeypatch.setattr(sd, "on_gpu", lambda index: True)
    monkeypatch.setattr(sd, "GPU_MAX_K", 64)
    table, summary = sd.semantic_dedup([x], keys, areas, config(), eval_parts=[evals])
    assert summary["eval_saturated_queries"] == 1 and summary["eval_pairs"] >= 64
    dropped = {r for r, reason in enumerate(table.column("reason").to_pylist()) if reason == "eval"}
    assert dropped == set(touched_groups[0]) | set(touched_groups[1])


def test_a_collapsed_embedder_is_refused_not_merged_into_one_image():
    """Every CLS alike (a collapsed or untrained backbone): one component would swallow the
    pool. The stage refuses, naming the threshold and the check, unless told otherwise."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(32)
    x = unit(base + 0.05 * rng.standard_normal((150, 32)))  # pairwise cosine ~0.99
    keys = [f"{i:09d}" for i in range(150)]
    areas = np.ones(150)
    with pytest.raises(ValueError, match=r"holds 150 of the 150 images.*max_component_share"):
        sd.semantic_dedup([x], keys, areas, config())
    table, summary = sd.semantic_dedup([x], keys, areas, config(max_component_share=1.0))
    assert summary["kept"] == 1 and summary["largest_component"] == 150
    # A real pool with planted groups stays far below the share.
    pool, pkeys, pareas, _ = make_pool(300)
    assert sd.semantic_dedup([pool], pkeys, pareas, config(max_component_share=0.05))[1]["kept"]
    with pytest.raises(ValueError, match="max_component_share must be in"):
        sd.check_semdedup_config(config(max_component_share=0))
