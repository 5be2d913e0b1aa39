"""Dedup as a view over the crawl: exact (sha256) and near-exact (pHash) duplicates.

Reads only the manifests, never rewrites shards, and writes RUN/dedup/dedup.parquet with one
row per successful sample: ``key``, ``duplicate_of`` (null for survivors), ``reason``
(``exact`` / ``near`` / null) and ``distance`` (pHash Hamming distance to its survivor's hash).

Near duplicates are found with FAISS's multi-index hashing: each 64-bit hash is cut into
threshold+1 substrings, so by the pigeonhole principle two hashes within the threshold agree
exactly on at least one substring and meet in one bucket; no O(N^2) pair scan.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.layout import CRAWL_SCHEMA, DEDUP_SCHEMA, RunLayout
from pipeline.shardio import write_parquet_atomic
from pretrain.configtools import atomic_write_text


def load_successes(layout: RunLayout, columns: tuple[str, ...] = ("sha256", "phash")) -> pa.Table:
    """key + ``columns`` of every successful sample across done crawl shards, sorted by key."""
    tables = []
    for shard in layout.crawl_done():
        table = pq.read_table(shard.parquet, columns=["key", "status", *columns])
        tables.append(table.filter(pc.equal(table["status"], "success")).drop(["status"]))
    if not tables:
        return CRAWL_SCHEMA.empty_table().select(["key", *columns])
    return pa.concat_tables(tables).sort_by("key")


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with Hamming distance <= threshold, via a multi-hash index."""
    import faiss  # imported here: the crawl itself never needs it

    codes = hashes.astype(">u8").view(np.uint8).reshape(-1, 8)  # (N, 8) bytes per hash
    n_substrings = threshold + 1
    bits_per_substring = 64 // n_substrings
    index = faiss.IndexBinaryMultiHash(64, n_substrings, bits_per_substring)
    index.add(codes)
    # range_search keeps distances strictly below the radius.
    lims, distances, labels = index.range_search(codes, threshold + 1)
    queries = np.repeat(np.arange(len(hashes)), np.diff(lims).astype(np.int64))
    keep = queries < labels
    return queries[keep], labels[keep], distances[keep]


def find_duplicates(table: pa.Table, threshold: int) -> pa.Table:
    """One survivor per group (the smallest key); every other member points at it."""
    keys = table["key"].to_pylist()
    n = len(keys)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    shas = table["sha256"].to_pylist()
    first_by_sha: dict[str, int] = {}
    for i, sha in enumerate(shas):
        if sha in first_by_sha:
            parent[i] = first_by_sha[sha]
        else:
            first_by_sha[sha] = i
    hashes = table["phash"].to_numpy(zero_copy_only=False).astype(np.uint64)
    if n and threshold >= 0:
        # Byte copies share their hash: search one row per distinct sha256 only. A crawl where
        # a picture sits behind many URLs would otherwise make every pair of copies a result
        # row (a group of g copies gives g^2 of them), which is memory the driver need not hold.
        reps = np.fromiter(sorted(first_by_sha.values()), dtype=np.int64, count=len(first_by_sha))
        for i, j, _ in zip(*near_pairs(hashes[reps], threshold)):
            a, b = root(int(reps[i])), root(int(reps[j]))
            if a != b:
                parent[max(a, b)] = min(a, b)  # rows are key-sorted: the smaller key survives
    survivors = [root(i) for i in range(n)]
    duplicate_of, reason, distance = [], [], []
    for i, s in enumerate(survivors):
        if s == i:
            duplicate_of.append(None), reason.append(None), distance.append(None)
            continue
        duplicate_of.append(keys[s])
        # By the relation to the survivor itself, not to the row a chain went through: a
        # byte copy of a near duplicate is a near duplicate of the survivor.
        reason.append("exact" if shas[i] == shas[s] else "near")
        distance.append(int(hashes[i] ^ hashes[s]).bit_count())
    return pa.table(
        {"key": keys, "duplicate_of": duplicate_of, "reason": reason, "distance": distance},
        schema=DEDUP_SCHEMA,
    )


def run_dedup(layout: RunLayout, threshold: int) -> dict:
    """Write RUN/dedup/dedup.parquet and dedup/summary.json; return the summary."""
    result = find_duplicates(load_successes(layout), threshold)
    layout.dedup_dir.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(result, layout.dedup_parquet)
    reasons = result["reason"].to_pylist()
    summary = {
        "samples": result.num_rows,
        "survivors": reasons.count(None),
        "exact_duplicates": reasons.count("exact"),
        "near_duplicates": reasons.count("near"),
        "phash_threshold": threshold,
    }
    atomic_write_text(layout.dedup_summary, json.dumps(summary, indent=2) + "\n")
    return summary
