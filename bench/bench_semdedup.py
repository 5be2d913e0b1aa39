"""Semantic dedup (pipeline.stages.semdedup.semantic_dedup) at growing pool sizes: flat, IVF, IMI.

    python bench/bench_semdedup.py                          # IVF, IMI 50k/100k/200k; flat 50k/100k
    python bench/bench_semdedup.py --sizes 5000 --flat-sizes 5000        # smoke run
    python bench/bench_semdedup.py --flat-sizes 50000,100000,200000      # flat 200k: ~30 TFLOP

Data: synthetic 384-d float16 embeddings, stored as memory-mapped `.npy` parts of 50k rows
like the embed stage writes them: points around a few thousand random centres on the sphere
(cosine to the centre 0.55-0.8, so same-cluster pairs sit well below the 0.9 threshold, as
same-class images do), plus ~5% planted near copies of earlier rows (cosine 0.93-0.99; a copy
of a copy makes chains). A size N uses the first N rows: every copy's source comes before it.

Each (index, size) runs `semantic_dedup` in a fresh subprocess: wall time, its stage split,
and the peak RSS of that process (ru_maxrss; the baseline after imports is shown too).
Recall: of the undirected duplicate pairs (cosine > threshold among the k nearest) that flat
finds at the same size, the share IVF / IMI find (goal >= 0.95); `planted`: the share of planted
(source, copy) pairs above the threshold whose two rows end up in one component. Each run's row
(with its recall vs flat once flat has run at that size) is appended to `--jsonl` (default
runs/bench/semdedup.jsonl) as it finishes.

Cost estimate on the CPU: flat searches N^2 * D multiply-adds (200k: 15 T, ~10 min on 2 busy
cores at ~40 GFLOP/s), hence flat's sizes are a separate flag and stop at 100k by default.
IVF (nlist ~ 4 sqrt(N), nprobe 32) scans about sqrt(N) rows a query: it grows as N^1.5. IMI
(IVF-Flat over an inverted multi-index of two 2^b-centroid halves, 4^b ~ N/64 lists, nprobe 32)
scans about the same few thousand rows a query at any N: it grows linearly.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _rows import RowWriter, add_jsonl_arg

PART_ROWS = 50_000


def make_data(root: Path, n: int, dim: int, clusters: int, copies: float, seed: int) -> None:
    """float16 parts 0000.npy... and planted.npy: (source, copy) rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.75, 1.5, clusters).astype(np.float32)  # cosine to centre 0.55-0.8
    which = rng.integers(0, clusters, n)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, PART_ROWS):
        w = which[s : s + PART_ROWS]
        noise = rng.standard_normal((len(w), dim)).astype(np.float32)
        x[s : s + PART_ROWS] = centres[w] + noise * (spread[w] / np.sqrt(dim))[:, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copy_rows = np.nonzero(rng.random(n) < copies)[0]
    copy_rows = copy_rows[copy_rows > 0]
    sources = (rng.random(len(copy_rows)) * copy_rows).astype(np.int64)  # an earlier row
    eps = rng.uniform(0.15, 0.4, len(copy_rows)).astype(np.float32)  # cosine ~0.93-0.99
    for c, src, e in zip(copy_rows, sources, eps):  # in order: copies of copies chain
        v = x[src] + rng.standard_normal(dim).astype(np.float32) * (e / np.sqrt(dim))
        x[c] = v / np.linalg.norm(v)
    x16 = x.astype(np.float16)
    for i, s in enumerate(range(0, n, PART_ROWS)):
        np.save(root / f"{i:04d}.npy", x16[s : s + PART_ROWS])
    np.save(root / "planted.npy", np.stack([sources, copy_rows], axis=1))


def load_parts(root: Path, n: int) -> list[np.ndarray]:
    parts, left = [], n
    for path in sorted(root.glob("[0-9]*.npy")):
        if left <= 0:
            break
        part = np.load(path, mmap_mode="r")
        parts.append(part[:left])
        left -= len(parts[-1])
    return parts


def worker(args) -> None:
    """One semantic_dedup run in this (fresh) process; prints a JSON line."""
    import faiss

    from pipeline.config import SemDedupConfig
    from pipeline.stages import semdedup as sd

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    if args.train_points_per_list:
        sd.TRAIN_POINTS_PER_LIST = args.train_points_per_list
    root, n = Path(args.data), args.worker_n
    parts = load_parts(root, n)
    keys = [f"{i:09d}" for i in range(n)]
    areas = np.random.default_rng(1).integers(1, 100, n).astype(np.int64) * 1000
    cfg = SemDedupConfig(k=args.k, threshold=args.threshold, index=args.worker_index,
                         ivf_nprobe=args.nprobe, pq_m=args.pq_m, use_gpu=args.gpu)  # fmt: skip
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    captured = []

    def search(index, parts, k, threshold, rescore=False):
        edges = sd.search_all(index, parts, k, threshold, cfg.query_chunk, rescore)
        captured.append(edges)
        return edges

    sd.semantic_table(
        ["a", "b"],
        sd.components(2, np.array([0]), np.array([1])),
        np.zeros(2, int),
        np.zeros(2, np.float32),
    )  # fmt: skip  (imports warmed outside the timing)
    t = time.perf_counter()
    table, summary = sd.semantic_dedup(parts, keys, areas, cfg, search=search)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows, cols, _ = captured[0]
    pairs = np.unique(np.minimum(rows, cols) * n + np.maximum(rows, cols))
    np.save(root / f"pairs-{summary['index']}-{n}.npy", pairs)
    labels = table.column("component").to_numpy()
    planted = np.load(root / "planted.npy")
    planted = planted[planted[:, 1] < n]
    a = np.asarray(sd.rows_of(parts, planted[:, 0]), np.float32)
    b = np.asarray(sd.rows_of(parts, planted[:, 1]), np.float32)
    above = planted[np.einsum("ij,ij->i", a, b) > args.threshold]
    joined = float((labels[above[:, 0]] == labels[above[:, 1]]).mean()) if len(above) else 1.0
    print(json.dumps({"n": n, "index": summary["index"], "wall_s": wall, "base_rss_mb": base_rss,
                      "peak_rss_mb": peak, "planted_recall": joined, "summary": summary}))  # fmt: skip


def run_one(args, n: int, index: str) -> dict:
    cmd = [sys.executable, __file__, "--data", args.data, "--worker-n", str(n),
           "--worker-index", index] + _shared_flags(args)  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{index} {n}: worker failed\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shared_flags(args) -> list[str]:
    flags = ["--k", str(args.k), "--threshold", str(args.threshold), "--nprobe", str(args.nprobe),
             "--pq-m", str(args.pq_m), "--threads", str(args.threads),
             "--train-points-per-list", str(args.train_points_per_list)]  # fmt: skip
    return flags + (["--gpu"] if args.gpu else [])


def pair_recall(root: Path, n: int, index: str) -> float | None:
    ref, got = root / f"pairs-flat-{n}.npy", root / f"pairs-{index}-{n}.npy"
    if index == "flat" or not ref.exists() or not got.exists():
        return None
    ref_pairs = np.load(ref)
    return float(np.isin(ref_pairs, np.load(got)).mean()) if len(ref_pairs) else 1.0


def report(args, results: list[dict]) -> None:
    root = Path(args.data)
    print(f"\n`{' '.join(shlex.quote(a) for a in sys.argv)}`\n")
    print("| index | N | wall s | index s | search s | rest s | peak RSS MB | edges | dropped "
          "| largest comp | recall vs flat | planted recall |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, sec = r["summary"], r["summary"]["seconds"]
        recall = pair_recall(root, r["n"], r["index"])
        rest = r["wall_s"] - sec["index"] - sec["search"]
        print(f"| {r['index']} | {r['n']:,} | {r['wall_s']:.1f} | {sec['index']:.1f} | "
              f"{sec['search']:.1f} | {rest:.1f} | {r['peak_rss_mb']:.0f} "
              f"(base {r['base_rss_mb']:.0f}) | {s['edges']:,} | {s['semantic_duplicates']:,} | "
              f"{s['largest_component']} | {'-' if recall is None else f'{recall:.4f}'} | "
              f"{r['planted_recall']:.4f} |")  # fmt: skip
    for index in sorted({r["index"] for r in results}):
        runs = sorted((r["n"], r["wall_s"]) for r in results if r["index"] == index)
        if len(runs) > 1:
            (n0, t0), (n1, t1) = runs[0], runs[-1]
            print(f"\n{index}: time {n1:,}/{n0:,} = {t1 / t0:.2f}x for {n1 / n0:.1f}x the rows")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="50000,100000,200000", help="IVF / IMI pool sizes")
    p.add_argument("--flat-sizes", default="50000,100000", help="flat pool sizes ('' for none)")
    p.add_argument("--indexes", default="flat,ivf,imi", help="index kinds to run")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clusters", type=int, default=4000)
    p.add_argument("--copies", type=float, default=0.05, help="share of planted near copies")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--pq-m", type=int, default=0, help="IVF-PQ sub-quantizers (0: IVF-Flat)")
    p.add_argument("--train-points-per-list", type=int, default=0, help="0: the module's")
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: default)")
    p.add_argument("--gpu", action="store_true", help="use_gpu=True (when FAISS sees one)")
    p.add_argument("--data", default="", help="data folder (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    add_jsonl_arg(p, "semdedup")
    p.add_argument("--worker-n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-index", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_n:
        return worker(args)
    kinds = [k for k in args.indexes.split(",") if k]
    sizes = [int(s) for s in args.sizes.split(",") if s] if set(kinds) - {"flat"} else []
    flat = [int(s) for s in args.flat_sizes.split(",") if s] if "flat" in kinds else []
    with tempfile.TemporaryDirectory(prefix="bench-semdedup-") as tmp:
        args.data = args.data or tmp
        Path(args.data).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        make_data(Path(args.data), max(sizes + flat), args.dim, args.clusters, args.copies,
                  args.seed)  # fmt: skip
        print(
            f"data: {max(sizes + flat):,} x {args.dim} float16 in {time.perf_counter() - t:.1f} s"
        )
        rows = RowWriter.from_args(args, "semdedup")
        setting = {"dim": args.dim, "k": args.k, "threshold": args.threshold,
                   "nprobe": args.nprobe, "pq_m": args.pq_m, "threads": args.threads,
                   "gpu": args.gpu}  # fmt: skip
        results = []
        for n in sorted(set(sizes + flat)):
            for index in kinds:
                if n in (flat if index == "flat" else sizes):
                    results.append(run_one(args, n, index))
                    recall = pair_recall(Path(args.data), n, results[-1]["index"])
                    rows.write({**setting, **results[-1], "recall_vs_flat": recall})
                    print(f"{index} {n:,}: {results[-1]['wall_s']:.1f} s", flush=True)
        report(args, results)


if __name__ == "__main__":
    main()
