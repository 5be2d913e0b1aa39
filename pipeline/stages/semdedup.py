"""Semantic dedup and eval-set decontamination over stored embeddings, as DINOv2 does it.

Plain functions, no Ray: the runner may spread query chunks over Ray tasks (``search_edges``
per chunk, the index shipped with ``serialize_index``), or call ``semantic_dedup`` in-process.

1. An inner-product FAISS index over the L2-normalised embeddings: exact (flat) below
   ``ivf_min_size``, an inverted file (IVF, IVF-PQ with ``pq_m``) from there on; built on the
   GPU(s) when ``use_gpu`` and FAISS sees one (sharded over several GPUs when big, float16 with
   ``gpu_float16``: ``pipeline.resources.index_to_gpus``).
2. The ``k`` nearest neighbours of every embedding (itself among them), queried in chunks; an
   edge for every neighbour other than itself with cosine similarity above ``threshold``.
3. Connected components of that undirected graph (scipy); one survivor per component: the
   largest original area, then the smallest key, whatever the input order.
4. Decontamination: every pool image with cosine above the decontamination threshold to any
   eval image marks its component, and marked components are dropped whole. Exact
   ``range_search`` on CPU indexes (a kNN search would miss pool images beyond its k for a
   common eval image); GPU indexes have no range search, there a kNN search doubles k while a
   query's last neighbour is still above the threshold (up to FAISS's GPU limit, 2048).

Verdicts, one row per pool embedding (``reason`` null = kept):

- ``semantic``: ``duplicate_of`` = the survivor's key, ``similarity`` = cosine to the survivor
  (recomputed from the embeddings; in a chain it can be below the threshold);
- ``eval`` (overrides ``semantic``; the survivor goes too): ``duplicate_of`` = the key of the
  eval image in the component's strongest pool-eval match (null without eval keys),
  ``similarity`` = that match's cosine: the same for every member of the component.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.layout import SEMANTIC_SCHEMA
from pipeline.resources import check_gpus_per_task, index_to_gpus

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "ivf", "imi")
# IMI: at least one inverted list per IMI_ROWS_PER_LIST rows (16 to 64 rows a list: the list
# count moves in steps of 4), so a query scans the same few thousand rows at any N and
# the search grows linearly (docs/benchmarks.md); its two 2^bits codebooks train in a second.
IMI_ROWS_PER_LIST = 64
GPU_MAX_K = 2048  # FAISS GPU indexes: k (and nprobe) at most this
# IVF training sample: this many rows per list (FAISS accepts 39 to 256). With FAISS's 256 and
# nlist ~ 4 sqrt(n), every row trains below ~1M rows and training costs n^1.5; at 64 it grows
# linearly. Capped at TRAIN_MAX_ROWS, never below 39 per list.
TRAIN_POINTS_PER_LIST = 64
TRAIN_MAX_ROWS = 4_000_000
NORM_TOLERANCE = 0.02
RESCORE_BLOCK = 1024  # queries per block when re-scoring neighbours exactly (IVF-PQ)
EVAL_CHUNK = 4096  # eval queries per range search: a common image can match many pool rows
Edges = tuple[np.ndarray, np.ndarray, np.ndarray]  # rows, cols (global ids), float32 similarity
Search = Callable[..., Edges]  # (index, parts, k, threshold[, rescore=True]) -> edges


def _check_threshold(value, name: str) -> None:
    if not 0 < value <= 1:  # NaN fails too
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def check_semdedup_config(cfg) -> None:
    """Raise ValueError naming the first semdedup setting outside its range."""
    _check_threshold(cfg.threshold, "semdedup.threshold")
    if cfg.index not in INDEX_KINDS:
        raise ValueError(f"semdedup.index must be one of {INDEX_KINDS}, got {cfg.index!r}")
    for name in ("k", "ivf_nprobe", "query_chunk", "ivf_min_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"semdedup.{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("ivf_nlist", "pq_m", "imi_bits"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"semdedup.{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.max_component_share <= 1:
        raise ValueError(
            f"semdedup.max_component_share must be in (0, 1], got {cfg.max_component_share}"
        )
    check_gpus_per_task(cfg.gpus_per_task, "semdedup.gpus_per_task")


def check_decontaminate_config(cfg) -> None:
    _check_threshold(cfg.threshold, "decontaminate.threshold")


# -- inputs -----------------------------------------------------------------------------------


def embedding_dim(parts: Sequence[np.ndarray], what: str) -> int:
    """The common dimension of 2-D ``parts``; ValueError naming both if they differ."""
    dims = {p.shape[1] for p in parts if p.ndim == 2}
    if any(p.ndim != 2 for p in parts) or len(dims) != 1:
        shapes = sorted({tuple(p.shape) for p in parts})
        raise ValueError(f"{what} embeddings must be 2-D with one dimension, got shapes {shapes}")
    return dims.pop()


def check_normalised(parts: Sequence[np.ndarray], what: str, sample: int = 1024) -> None:
    """Cosine similarity is an inner product only for unit rows: check the first rows."""
    for part in parts:
        if part.shape[0]:
            norms = np.linalg.norm(np.asarray(part[:sample], np.float32), axis=1)
            worst = float(np.abs(norms - 1).max())
            if not worst <= NORM_TOLERANCE:  # NaN rows fail too
                raise ValueError(
                    f"{what} embeddings must be L2-normalised (|norm - 1| = {worst:.3g})"
                )
            return


def chunks(parts: Sequence[np.ndarray], size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first global row, float32 chunk) over the parts: one chunk in memory at a time."""
    row = 0
    for part in parts:
        for start in range(0, part.shape[0], size):
            yield row + start, np.ascontiguousarray(part[start : start + size], dtype=np.float32)
        row += part.shape[0]


def rows_of(parts: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), dim]: the given global rows gathered from the parts."""
    offsets = np.cumsum([0] + [p.shape[0] for p in parts])
    out = np.empty((len(rows), parts[0].shape[1]), np.float32)
    which = np.searchsorted(offsets, rows, side="right") - 1
    for p in np.unique(which):
        mask = which == p
        out[mask] = parts[p][rows[mask] - offsets[p]]
    return out


def cosine_between(parts, a: np.ndarray, b: np.ndarray, chunk: int) -> np.ndarray:
    """float32 cosine of rows ``a[i]`` and ``b[i]``, gathered chunk by chunk."""
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), chunk):
        x, y = rows_of(parts, a[s : s + chunk]), rows_of(parts, b[s : s + chunk])
        out[s : s + chunk] = np.einsum("ij,ij->i", x, y)
    return out


# -- index ------------------------------------------------------------------------------------


def gpu_available(use_gpu: bool) -> bool:
    import faiss

    return bool(use_gpu and faiss.get_num_gpus() > 0)


def index_kind(cfg, n: int) -> str:
    """flat | ivf | ivfpq | imi for a pool of ``n`` embeddings. ``auto``: flat below
    ``ivf_min_size``; above it the inverted multi-index on CPU (linear growth), IVF on GPUs
    (FAISS's GPU IVF needs a flat coarse quantizer) or when PQ codes are asked for."""
    kind = cfg.index
    if kind == "auto":
        if n < cfg.ivf_min_size:
            kind = "flat"
        else:
            kind = "ivf" if cfg.pq_m or gpu_available(cfg.use_gpu) else "imi"
    if kind == "ivf" and cfg.pq_m:
        if n >= 256 * 39:  # 8-bit PQ codebooks: 256 centroids per sub-quantizer to train
            return "ivfpq"
        log.warning("semdedup: %d embeddings are too few to train PQ codes: IVF-Flat", n)
    return kind


def ivf_nlist(cfg, n: int) -> int:
    """cfg.ivf_nlist, else about 4 sqrt(n) lists, at least 39 training points each."""
    return cfg.ivf_nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))


def imi_bits(cfg, n: int) -> int:
    """Bits per half of the inverted multi-index: 4^bits lists, about n / IMI_ROWS_PER_LIST."""
    return cfg.imi_bits or max(1, math.ceil(math.log2(max(2, n / IMI_ROWS_PER_LIST)) / 2))


def n_lists(cfg, n: int) -> int:
    """The inverted lists of the index ``build_index`` makes for ``n`` rows (0: flat)."""
    kind = index_kind(cfg, n)
    return 0 if kind == "flat" else 4 ** imi_bits(cfg, n) if kind == "imi" else ivf_nlist(cfg, n)


def index_bytes(kind: str, n: int, dim: int, pq_m: int = 0) -> int:
    """About the memory of an index of ``kind`` over ``n`` rows: float32 vectors (flat), plus
    an 8-byte id per row in inverted lists, or PQ codes of ``pq_m`` bytes instead (ivfpq)."""
    per_row = {"flat": 4 * dim, "ivfpq": pq_m + 8}.get(kind, 4 * dim + 8)
    return int(n) * per_row


def build_index(parts: Sequence[np.ndarray], cfg, n_total: int, seed: int = 0):
    """An inner-product index holding every row of ``parts`` in order (ids = global rows).

    Flat, IVF-Flat, IVF-PQ or IVF-Flat over an inverted multi-index (``index_kind``); trained
    on a uniform sample of min(n, TRAIN_POINTS_PER_LIST * nlist) rows (IMI: 256 rows per
    codebook centroid), then filled chunk by chunk in float32. On every GPU when
    ``gpu_available(cfg.use_gpu)``, but for IMI, which FAISS runs on CPU only: an IVF index is
    trained on one GPU, then copied to all of them (``index_to_gpus``: sharded when big) and
    filled there; a flat one is filled first (FAISS's flat shards take a single add)."""
    import faiss

    dim = embedding_dim(parts, "pool")
    kind = index_kind(cfg, n_total)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "imi":
        if dim % 2:
            raise ValueError(f"semdedup.index=imi splits vectors in halves: dimension {dim} is odd")
        bits = imi_bits(cfg, n_total)
        # Product quantizer of two halves, L2: on unit vectors its order is the cosine's.
        index = faiss.IndexIVFFlat(faiss.MultiIndexQuantizer(dim, 2, bits), dim, 4**bits,
                                   faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        index.quantizer_trains_alone = 1  # k-means on each half; nothing trained on the lists
        index.nprobe = min(cfg.ivf_nprobe, index.nlist)
        # FAISS's most points per centroid: codebooks this cheap can afford balanced lists
        size = min(n_total, 256 * 2**bits)
        index.train(_training_sample(parts, n_total, size, seed))
    else:
        nlist = ivf_nlist(cfg, n_total)
        if nlist > n_total:
            raise ValueError(f"semdedup.ivf_nlist={nlist} exceeds the {n_total} embeddings")
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivfpq":
            if dim % cfg.pq_m:
                raise ValueError(f"semdedup.pq_m={cfg.pq_m} must divide the dimension {dim}")
            ip = faiss.METRIC_INNER_PRODUCT
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, cfg.pq_m, 8, ip)
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
    gpu = gpu_available(cfg.use_gpu) and kind != "imi"
    if kind in ("ivf", "ivfpq"):
        size = max(39 * nlist, min(TRAIN_POINTS_PER_LIST * nlist, TRAIN_MAX_ROWS))
        if kind == "ivfpq":  # and 256 rows per PQ centroid
            size = max(size, 256 * 256)
        sample = _training_sample(parts, n_total, min(n_total, size), seed)
        if gpu:  # one training (on one GPU) that every copy shares
            trainer = faiss.index_cpu_to_all_gpus(index, ngpu=1)
            trainer.train(sample)
            index = faiss.index_gpu_to_cpu(trainer)
            del trainer  # and its GPU resources, before the copies take theirs
        else:
            index.train(sample)
    if gpu and kind != "flat":  # trained, empty: filled on the GPUs
        index = index_to_gpus(index, index_bytes(kind, n_total, dim, cfg.pq_m), cfg.gpu_float16)
    for _, block in chunks(parts, cfg.query_chunk):
        index.add(block)
    if gpu and kind == "flat":
        index = index_to_gpus(index, index_bytes(kind, n_total, dim), cfg.gpu_float16)
    return index


def _training_sample(parts: Sequence[np.ndarray], n: int, size: int, seed: int) -> np.ndarray:
    picks = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return np.ascontiguousarray(rows_of(parts, picks))


def on_gpu(index) -> bool:
    """Whether ``index`` lives on GPUs (what ``index_to_gpus`` returns: one GPU index, or
    replicas / shards of them; the pipeline makes no CPU replicas or shards)."""
    name = type(index).__name__
    return name.startswith("Gpu") or name in ("IndexReplicas", "IndexShards")


def cpu_only(index) -> bool:
    """Whether FAISS runs ``index`` on the CPU only: the inverted multi-index (IMI)."""
    import faiss

    if on_gpu(index):
        return False
    quantizer = getattr(index, "quantizer", None)  # IVF: its coarse quantizer, as a base Index
    return quantizer is not None and isinstance(
        faiss.downcast_index(quantizer), faiss.MultiIndexQuantizer
    )


def serialize_index(index) -> np.ndarray:
    """uint8 bytes of the index (a CPU copy of a GPU index), for Ray's object store."""
    import faiss

    if faiss.get_num_gpus() > 0 and on_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index)


def deserialize_index(blob: np.ndarray, use_gpu: bool = False, float16: bool = False):
    """The index back from ``serialize_index``; on every GPU this process sees when asked and
    present (``index_to_gpus``: sharded when the blob is big, ``float16`` when asked)."""
    import faiss

    blob = np.asarray(blob, np.uint8)
    index = faiss.deserialize_index(blob)
    if cpu_only(index) or not gpu_available(use_gpu):
        return index
    return index_to_gpus(index, blob.nbytes, float16)


# -- kNN graph --------------------------------------------------------------------------------


def search_edges(
    index, queries: np.ndarray, first_row: int, k: int, threshold: float,
    exact_parts: Sequence[np.ndarray] | None = None,
) -> Edges:  # fmt: skip
    """One query chunk (global rows first_row...) -> its edges: neighbour above ``threshold``,
    self-matches removed. k counts the query itself, capped by the index size (and GPU_MAX_K).
    With ``exact_parts`` (IVF-PQ) the neighbours' similarities are recomputed from them."""
    k = min(k, index.ntotal, GPU_MAX_K if on_gpu(index) else k)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sims, cols = index.search(queries, k)
    if exact_parts is not None:
        sims = exact_sims(queries, cols, exact_parts)
    rows = np.repeat(np.arange(first_row, first_row + len(queries), dtype=np.int64), k)
    sims, cols = sims.reshape(-1), cols.reshape(-1).astype(np.int64)
    keep = (cols >= 0) & (cols != rows) & (sims > threshold)
    return rows[keep], cols[keep], sims[keep].astype(np.float32)


def exact_sims(queries: np.ndarray, cols: np.ndarray, parts: Sequence[np.ndarray]) -> np.ndarray:
    """float32 [q, k] cosine of each query with its neighbours ``cols`` (-1: -inf), gathered
    from ``parts``. PQ similarities are biased low (the codes shrink residuals: -0.2 on near
    copies at 48 bytes for 384-d) while their ranking stays good: re-score, keep the ranking."""
    out = np.full(cols.shape, -np.inf, np.float32)
    for s in range(0, len(queries), RESCORE_BLOCK):
        block, valid = cols[s : s + RESCORE_BLOCK], cols[s : s + RESCORE_BLOCK] >= 0
        q = np.repeat(queries[s : s + RESCORE_BLOCK], valid.sum(axis=1), axis=0)
        out[s : s + RESCORE_BLOCK][valid] = np.einsum("ij,ij->i", q, rows_of(parts, block[valid]))
    return out


def search_all(
    index, parts: Sequence[np.ndarray], k: int, threshold: float, chunk: int, rescore: bool = False
) -> Edges:
    """Every chunk of ``parts`` through ``search_edges``, in this process."""
    exact = parts if rescore else None
    return concat_edges(
        [search_edges(index, q, r, k, threshold, exact) for r, q in chunks(parts, chunk)]
    )


def concat_edges(found: Sequence[Edges]) -> Edges:
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate(column) for column in zip(*found))  # type: ignore[return-value]


def components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """int64 component label per row of the undirected graph given by the edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), np.bool_), (rows, cols)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def pick_survivors(labels: np.ndarray, keys: Sequence[str], areas: np.ndarray) -> np.ndarray:
    """Row of each row's survivor: in its component the largest area, then the smallest key."""
    labels = np.asarray(labels, np.int64)
    survivors = np.arange(len(labels), dtype=np.int64)
    shared = np.nonzero(np.bincount(labels)[labels] > 1)[0]  # rows of non-singleton components
    if not len(shared):
        return survivors
    key_rank = np.unique(np.asarray([str(keys[i]) for i in shared]), return_inverse=True)[1]
    lab = labels[shared]
    order = np.lexsort((key_rank.reshape(-1), -np.asarray(areas, np.int64)[shared], lab))
    first = np.ones(len(order), np.bool_)
    first[1:] = lab[order][1:] != lab[order][:-1]
    best = np.zeros(labels.max() + 1, np.int64)
    best[lab[order][first]] = shared[order][first]
    survivors[shared] = best[lab]
    return survivors


# -- decontamination --------------------------------------------------------------------------


def eval_matches(
    index, queries: np.ndarray, first_row: int, threshold: float, method: str = "auto",
    exact_parts: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # fmt: skip
    """(pool rows, eval rows, similarities, saturated queries): every pool-eval pair above
    ``threshold`` for one chunk of eval queries (global eval rows first_row...).

    ``range``: FAISS range search, exact on a flat index (IVF: within the probed lists). ``knn``: k doubles while a query's
    last neighbour is above the threshold, up to the pool (GPU_MAX_K on a GPU); queries still
    saturated there may miss matches and are counted. ``auto``: range, knn on a GPU index or
    with ``exact_parts`` (IVF-PQ: kNN ranking, similarities re-scored as in ``search_edges``)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if method == "range" or (method == "auto" and not on_gpu(index) and exact_parts is None):
        lims, sims, pool = index.range_search(queries, threshold)
        counts = np.diff(lims).astype(np.int64)
        evals = np.repeat(np.arange(first_row, first_row + len(queries), dtype=np.int64), counts)
        return pool.astype(np.int64), evals, sims.astype(np.float32), 0
    cap = min(index.ntotal, GPU_MAX_K if on_gpu(index) else index.ntotal)
    todo, k, found, saturated = np.arange(len(queries)), min(64, cap), [], 0
    while len(todo):
        sims, pool = index.search(queries[todo], k)
        if exact_parts is not None:
            sims = exact_sims(queries[todo], pool, exact_parts)
        full = sims[:, -1] > threshold  # the last neighbour matches: there may be more
        done = ~full if k < cap else np.ones(len(todo), np.bool_)
        if k == cap and cap < index.ntotal:
            saturated += int(full.sum())
        hit = (sims > threshold) & (pool >= 0) & done[:, None]
        found.append((pool[hit], np.repeat(todo + first_row, hit.sum(1)), sims[hit]))
        todo, k = todo[~done], min(2 * k, cap)
    pool, evals, sims = concat_edges(found)
    return pool.astype(np.int64), evals.astype(np.int64), sims.astype(np.float32), saturated


def best_per_group(groups: np.ndarray, others: np.ndarray, sims: np.ndarray) -> Edges:
    """(group, other, similarity) of each group's highest similarity (ties: smallest other)."""
    order = np.lexsort((others, -sims, groups))
    first = np.ones(len(order), np.bool_)
    first[1:] = groups[order][1:] != groups[order][:-1]
    pick = order[first]
    return groups[pick], others[pick], sims[pick]


def contaminated_components(
    index, eval_parts: Sequence[np.ndarray], labels: np.ndarray, threshold: float, chunk: int,
    method: str = "auto", exact_parts: Sequence[np.ndarray] | None = None,
) -> tuple[Edges, dict]:  # fmt: skip
    """((component ids, best eval row, its similarity), counts) of every pool component with
    an image above ``threshold`` to some eval image; reduced per eval chunk (bounded memory).
    ``exact_parts``: the pool's embeddings, to re-score IVF-PQ similarities (``eval_matches``)."""
    best, counts = concat_edges([]), {"eval_pairs": 0, "eval_saturated_queries": 0}
    for first, queries in chunks(eval_parts, chunk):
        found = eval_matches(index, queries, first, threshold, method, exact_parts)
        pool, evals, sims, saturated = found
        counts["eval_pairs"] += len(pool)
        counts["eval_saturated_queries"] += saturated
        best = best_per_group(*concat_edges([best, (labels[pool], evals, sims)]))
    if counts["eval_saturated_queries"]:
        log.warning("decontaminate: %d eval images match more than %d pool images; some matches "
                    "may be missed", counts["eval_saturated_queries"], GPU_MAX_K)  # fmt: skip
    return best, counts


# -- verdicts ---------------------------------------------------------------------------------


def semantic_table(
    keys: Sequence[str], labels: np.ndarray, survivors: np.ndarray, survivor_sim: np.ndarray,
    eval_hits: Edges | None = None, eval_keys: Sequence[str] | None = None,
) -> pa.Table:  # fmt: skip
    """One verdict row per pool row (module docstring). ``survivor_sim``: float32 [n], cosine to
    the survivor (read where the row is not its own survivor); ``eval_hits``: from
    ``contaminated_components``."""
    n = len(keys)
    key_arr = np.asarray(keys, dtype=object)
    dropped = survivors != np.arange(n)
    reason = np.full(n, None, dtype=object)
    duplicate_of = np.full(n, None, dtype=object)
    similarity = np.full(n, np.nan, np.float32)
    reason[dropped] = "semantic"
    duplicate_of[dropped] = key_arr[survivors[dropped]]
    similarity[dropped] = np.asarray(survivor_sim, np.float32)[dropped]
    if eval_hits is not None and len(eval_hits[0]):
        comps, evals, sims = eval_hits  # comps sorted (best_per_group)
        hit = np.isin(labels, comps)
        which = np.searchsorted(comps, labels[hit])
        reason[hit] = "eval"
        duplicate_of[hit] = (
            None if eval_keys is None else np.asarray(eval_keys, object)[evals[which]]
        )
        similarity[hit] = sims[which]
    columns = {
        "key": pa.array(key_arr, pa.string()),
        "duplicate_of": pa.array(duplicate_of, pa.string()),
        "reason": pa.array(reason, pa.string()),
        "similarity": pa.array(similarity, pa.float32(), mask=np.isnan(similarity)),
        "component": pa.array(np.asarray(labels, np.int64), pa.int64()),
    }
    return pa.table(columns, schema=SEMANTIC_SCHEMA)


def semantic_dedup(
    parts: Sequence[np.ndarray], keys: Sequence[str], areas: np.ndarray, cfg,
    eval_parts: Sequence[np.ndarray] | None = None, eval_keys: Sequence[str] | None = None,
    decon_threshold: float = 0.45, search: Search | None = None, eval_method: str = "auto",
) -> tuple[pa.Table, dict]:  # fmt: skip
    """Verdicts for every row of ``parts`` (module docstring) and a summary of counts.

    ``search(index, parts, k, threshold) -> edges`` may run the kNN queries elsewhere (Ray
    tasks running ``search_edges`` per chunk); by default ``search_all`` here. For IVF-PQ it is
    called with ``rescore=True`` as well: its tasks must then pass the pool's embeddings as
    ``exact_parts``, since PQ similarities are re-scored exactly from the embeddings (neighbours
    and eval matches) so that ``threshold`` keeps its meaning."""
    n, eval_parts = check_inputs(parts, keys, areas, cfg, eval_parts, eval_keys, decon_threshold)
    rescore = index_kind(cfg, n) == "ivfpq"
    seconds, t = {}, time.perf_counter()
    index = build_index(parts, cfg, n)
    seconds["index"], t = time.perf_counter() - t, time.perf_counter()
    if search is None:
        rows, cols, _ = search_all(index, parts, cfg.k, cfg.threshold, cfg.query_chunk, rescore)
    else:  # rescore passed only when set: a 4-argument search fails loudly on IVF-PQ
        rows, cols, _ = search(
            index, parts, cfg.k, cfg.threshold, **({"rescore": True} if rescore else {})
        )
    seconds["search"], t = time.perf_counter() - t, time.perf_counter()
    labels = components(n, rows, cols)
    check_spread(labels, cfg)
    survivors = pick_survivors(labels, keys, areas)
    dropped = np.nonzero(survivors != np.arange(n))[0]
    survivor_sim = np.full(n, np.nan, np.float32)
    survivor_sim[dropped] = cosine_between(parts, dropped, survivors[dropped], cfg.query_chunk)
    seconds["components"], t = time.perf_counter() - t, time.perf_counter()
    hits, counts = None, {"eval_pairs": 0, "eval_saturated_queries": 0}
    if eval_parts:
        hits, eval_counts = contaminated_components(
            index, eval_parts, labels, decon_threshold, EVAL_CHUNK, eval_method,
            parts if rescore else None,
        )  # fmt: skip
        counts.update(eval_counts)
    seconds["decontaminate"], t = time.perf_counter() - t, time.perf_counter()
    table = semantic_table(keys, labels, survivors, survivor_sim, hits, eval_keys)
    seconds["table"] = time.perf_counter() - t
    counts.update(edges=len(rows), eval_images=sum(p.shape[0] for p in eval_parts))
    return table, _summary(table, labels, cfg, n, index, counts, seconds)


def check_spread(labels: np.ndarray, cfg) -> None:
    """ValueError when one component swallows more than ``cfg.max_component_share`` of a pool
    of at least 100 images: chaining through a continuum of look-alike features, which a
    collapsed or untrained embedder (every CLS alike) or a too low threshold gives."""
    n = len(labels)
    largest = int(np.bincount(labels).max()) if n else 0
    if n >= 100 and largest > cfg.max_component_share * n:
        raise ValueError(
            f"semantic dedup: one component holds {largest} of the {n} images at "
            f"semdedup.threshold={cfg.threshold}, above semdedup.max_component_share="
            f"{cfg.max_component_share}: the embedder does not tell these images apart "
            f"(collapsed or untrained? check embed.checkpoint) or the threshold is too low. "
            f"Rerun with redo=[semdedup] and a higher semdedup.threshold, or another embedder"
        )


def check_inputs(parts, keys, areas, cfg, eval_parts, eval_keys, decon_threshold):
    """(pool size, non-empty eval parts), or ValueError on anything semantic_dedup can't use."""
    check_semdedup_config(cfg)
    _check_threshold(decon_threshold, "decontaminate.threshold")
    n = sum(p.shape[0] for p in parts)
    if n == 0:
        raise ValueError("semantic dedup: the pool is empty after dedup (no embedded sample)")
    if len(keys) != n or len(areas) != n:
        raise ValueError(f"semantic dedup: {n} embeddings but {len(keys)} keys, {len(areas)} areas")
    dim = embedding_dim(parts, "pool")
    check_normalised(parts, "pool")
    eval_parts = [p for p in (eval_parts or []) if p.shape[0]]
    if eval_parts and (eval_dim := embedding_dim(eval_parts, "eval")) != dim:
        raise ValueError(f"decontaminate: eval embeddings have dimension {eval_dim}, the pool "
                         f"{dim}: embed both with the same model")  # fmt: skip
    check_normalised(eval_parts, "eval")
    if eval_keys is not None and len(eval_keys) != sum(p.shape[0] for p in eval_parts):
        raise ValueError(f"decontaminate: {len(eval_keys)} eval keys for the eval embeddings")
    return n, eval_parts


def _summary(table, labels, cfg, n, index, counts, seconds) -> dict:
    reasons = table.column("reason").to_numpy(zero_copy_only=False)
    sizes = np.bincount(labels)
    kind = index_kind(cfg, n)
    return {
        "samples": n,
        "kept": int((reasons == None).sum()),  # noqa: E711  (element-wise)
        "semantic_duplicates": int((reasons == "semantic").sum()),
        "eval_contaminated": int((reasons == "eval").sum()),
        "components_with_duplicates": int((sizes > 1).sum()),
        "largest_component": int(sizes.max()),
        "index": kind,
        "gpu": on_gpu(index),
        "nlist": n_lists(cfg, n),
        "k": int(min(cfg.k, n)),
        "threshold": cfg.threshold,
        **{name: int(v) for name, v in counts.items()},  # edges: directed kNN hits
        "seconds": {name: round(s, 3) for name, s in seconds.items()},
    }
