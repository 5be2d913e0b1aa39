"""Hierarchical k-means (pipeline.stages.cluster): overhead over bare FAISS, and memory at 1M.

    python bench/bench_kmeans.py                         # (a) 200k x 384, k=1000; (b) 1M, 1000/100
    python bench/bench_kmeans.py --a-n 20000 --a-k 100 --b-n 20000 --b-levels 100,10  # smoke run

Data: synthetic 384-d float16 embeddings stored as memory-mapped `.npy` parts of 50k rows like
the embed stage writes them: points around `--centres` random centres on the sphere with
Zipf-like cluster sizes (cosine to the centre 0.55-0.8). A size N uses the first N rows.

(a) Level 1 alone, in one fresh process: `hierarchical_kmeans` with one level, no resampling
and FAISS's random init (what bare FAISS does), against bare `faiss.Kmeans(spherical=True)`
train + assignment of every row (`km.index.search`), on the same rows, clusters, iterations and
seed. Ours runs from the float32 array bare FAISS gets (like for like: same centroids and
labels are expected when N <= k * 256, and checked) and from the float16 memory-mapped parts
(the pipeline's path: sample gather, float16 -> float32 per chunk). The goal: ours at most 1.2x
bare FAISS. A last row runs the default level-1 recipe (k-means++ seeds, one resampling step)
for reference.

(b) `hierarchical_kmeans` with `--b-levels` (default 1000,100, the module's resampling steps
and sample sizes) over N rows read from the memory-mapped parts, in a fresh process: wall time
and peak memory. `peak RSS` is ru_maxrss, which counts the pages of the memory-mapped parts
that were read (file cache, shared, reclaimable); `peak anon` samples the process's anonymous
memory (RssAnon, every 20 ms): what the clustering itself holds. Both are compared with the
embeddings' float32 size (N x D x 4 bytes).

(a)'s and (b)'s rows are appended to `--jsonl` (default runs/bench/kmeans.jsonl) as each ends.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _rows import RowWriter, add_jsonl_arg

PART_ROWS = 50_000


def make_data(root: Path, n: int, dim: int, centres: int, seed: int) -> None:
    """float16 parts 0000.npy, ... of unit rows around Zipf-sized clusters."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, centres + 1) ** 0.8
    spread = rng.uniform(0.75, 1.5, centres).astype(np.float32)  # cosine to centre 0.55-0.8
    for i, s in enumerate(range(0, n, PART_ROWS)):
        m = min(PART_ROWS, n - s)
        which = rng.choice(centres, size=m, p=weights / weights.sum())
        x = (
            c[which]
            + rng.standard_normal((m, dim), np.float32) * (spread[which] / np.sqrt(dim))[:, None]
        )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / f"{i:04d}.npy", x.astype(np.float16))


def load_parts(root: Path, n: int) -> list[np.ndarray]:
    parts, left = [], n
    for path in sorted(root.glob("[0-9]*.npy")):
        if left <= 0:
            break
        parts.append(np.load(path, mmap_mode="r")[:left])
        left -= len(parts[-1])
    return parts


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak RssAnon of this process, sampled every ``every`` seconds in a thread."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self._stop = 0.0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def worker_a(args) -> dict:
    import faiss

    from pipeline.stages import cluster as cl

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    parts = load_parts(Path(args.data), args.a_n)
    x = np.concatenate([np.asarray(p, np.float32) for p in parts])
    gpu = cl.gpu_available(args.gpu)
    like = cl.ClusterConfig(levels=[args.a_k], iterations=args.iterations, resampling_steps=[0],
                            sample_sizes=[0], init="faiss", seed=args.seed, use_gpu=args.gpu)  # fmt: skip
    default = cl.ClusterConfig(levels=[args.a_k], iterations=args.iterations, resampling_steps=[1],
                               sample_sizes=[0], seed=args.seed, use_gpu=args.gpu)  # fmt: skip
    warm = faiss.Kmeans(x.shape[1], 10, niter=2, spherical=True, gpu=gpu)
    warm.train(x[:2000])  # FAISS, OpenMP and BLAS warmed outside the timings
    times: dict[str, list[float]] = {"bare": [], "ours_f32": [], "ours_f16_mmap": []}

    def bare():
        km = faiss.Kmeans(x.shape[1], args.a_k, niter=args.iterations, spherical=True,
                          seed=args.seed, gpu=gpu)  # fmt: skip
        km.train(x)
        return km, km.index.search(x, 1)[1][:, 0]

    runs = {"bare": bare, "ours_f32": lambda: cl.hierarchical_kmeans(x, like)[0],
            "ours_f16_mmap": lambda: cl.hierarchical_kmeans(parts, like)[0]}  # fmt: skip
    out = {}
    for r in range(args.repeats):  # interleaved, order flipped: machine load hits every variant
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            out[name] = runs[name]()
            times[name].append(time.perf_counter() - t)
    (km, bare_labels), ours, ours16 = out["bare"], out["ours_f32"], out["ours_f16_mmap"]
    t = time.perf_counter()
    cl.hierarchical_kmeans(parts, default)
    times["ours_default_f16_mmap"] = [time.perf_counter() - t]
    same_labels = float(np.mean(ours.assignment == bare_labels))
    diff = float(np.abs(ours.centroids - km.centroids).max())
    agree16 = float(np.mean(ours16.assignment == bare_labels))
    return {"n": args.a_n, "k": args.a_k, "dim": x.shape[1], "gpu": gpu,
            "times": {k: min(v) for k, v in times.items()}, "same_labels_f32": same_labels,
            "max_centroid_diff_f32": diff, "same_labels_f16": agree16,
            "sampled": args.a_n > args.a_k * like.max_points_per_centroid}  # fmt: skip


def worker_b(args) -> dict:
    from pipeline.stages import cluster as cl

    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    levels = [int(k) for k in args.b_levels.split(",")]
    defaults = cl.ClusterConfig()
    cfg = cl.ClusterConfig(
        levels=levels, iterations=args.iterations, seed=args.seed, use_gpu=args.gpu,
        resampling_steps=(defaults.resampling_steps + [10] * len(levels))[: len(levels)],
        sample_sizes=[0] * len(levels),
    )  # fmt: skip
    parts = load_parts(Path(args.data), args.b_n)
    cl.assign(np.asarray(parts[0][:8], np.float32), np.asarray(parts[0][:100], np.float32))
    base, base_anon = rss_mb(), AnonPeak.now()
    with AnonPeak() as anon:
        t = time.perf_counter()
        result = cl.hierarchical_kmeans(parts, cfg)
        wall = time.perf_counter() - t
    dim = parts[0].shape[1]
    sizes = np.bincount(result[0].assignment, minlength=levels[0])
    return {"n": args.b_n, "dim": dim, "levels": levels,
            "resampling_steps": cfg.resampling_steps, "wall_s": wall,
            "base_rss_mb": base, "peak_rss_mb": rss_mb(), "base_anon_mb": base_anon,
            "peak_anon_mb": anon.peak, "float32_mb": args.b_n * dim * 4 / 2**20,
            "train_rows_l1": cl.training_size(args.b_n, levels[0], cfg),
            "empty_l1": int((sizes == 0).sum()), "largest_l1": int(sizes.max()),
            "gpu": cl.gpu_available(args.gpu)}  # fmt: skip


def run_worker(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--data", args.data,
           "--a-n", str(args.a_n), "--a-k", str(args.a_k), "--b-n", str(args.b_n),
           "--b-levels", args.b_levels, "--iterations", str(args.iterations),
           "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--seed", str(args.seed)] + (["--gpu"] if args.gpu else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"worker {which} failed\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(a: dict | None, b: dict | None) -> None:
    print(f"\n`{' '.join(shlex.quote(s) for s in sys.argv)}`\n")
    if a:
        t = a["times"]
        print(f"(a) level 1: {a['n']:,} x {a['dim']} into {a['k']:,} clusters, "
              f"{'GPU' if a['gpu'] else 'CPU'}, train + assign every row; "
              f"training sample {'< all rows' if a['sampled'] else '= all rows'}\n")  # fmt: skip
        print("| run | wall s | vs bare FAISS |")
        print("|---|---|---|")
        names = {"bare": "bare faiss.Kmeans (float32 in memory)",
                 "ours_f32": "ours, same settings (float32 in memory)",
                 "ours_f16_mmap": "ours, same settings (float16 mmap parts)",
                 "ours_default_f16_mmap": "ours, k-means++ + 1 resampling step (float16 mmap)"}  # fmt: skip
        for key, name in names.items():
            print(f"| {name} | {t[key]:.2f} | {t[key] / t['bare']:.2f}x |")
        print(f"\nours (float32) vs bare: labels equal {a['same_labels_f32']:.2%}, max centroid "
              f"difference {a['max_centroid_diff_f32']:.1e}; float16 parts: labels equal "
              f"{a['same_labels_f16']:.2%}\n")  # fmt: skip
    if b:
        print(f"(b) hierarchical k-means {b['n']:,} x {b['dim']} float16 mmap, levels "
              f"{b['levels']}, resampling {b['resampling_steps']}, "
              f"{'GPU' if b['gpu'] else 'CPU'}\n")  # fmt: skip
        print(
            "| N | wall s | level-1 training rows | peak RSS MB (after imports) "
            "| peak anon MB (after imports) | float32 embeddings MB | empty / largest L1 |"
        )
        print("|---|---|---|---|---|---|---|")
        print(f"| {b['n']:,} | {b['wall_s']:.1f} | {b['train_rows_l1']:,} | "
              f"{b['peak_rss_mb']:.0f} ({b['base_rss_mb']:.0f}) | {b['peak_anon_mb']:.0f} "
              f"({b['base_anon_mb']:.0f}) | {b['float32_mb']:.0f} | {b['empty_l1']} / "
              f"{b['largest_l1']:,} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--a-n", type=int, default=200_000, help="(a) rows; 0 skips (a)")
    p.add_argument("--a-k", type=int, default=1000, help="(a) clusters")
    p.add_argument("--b-n", type=int, default=1_000_000, help="(b) rows; 0 skips (b)")
    p.add_argument("--b-levels", default="1000,100", help="(b) clusters per level")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="(a) timings: best of this many")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--centres", type=int, default=3000, help="synthetic cluster centres")
    p.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: default)")
    p.add_argument("--gpu", action="store_true", help="use_gpu=True (when FAISS sees one)")
    p.add_argument("--data", default="", help="data folder (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    add_jsonl_arg(p, "kmeans")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = worker_a(args) if args.worker == "a" else worker_b(args)
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory(prefix="bench-kmeans-") as tmp:
        args.data = args.data or tmp
        root = Path(args.data)
        root.mkdir(parents=True, exist_ok=True)
        n = max(args.a_n, args.b_n)
        have = sum(np.load(f, mmap_mode="r").shape[0] for f in root.glob("[0-9]*.npy"))
        if have < n:
            t = time.perf_counter()
            make_data(root, n, args.dim, args.centres, args.seed)
            print(f"data: {n:,} x {args.dim} float16 in {time.perf_counter() - t:.1f} s")
        rows = RowWriter.from_args(args, "kmeans")
        setting = {"iterations": args.iterations, "threads": args.threads, "seed": args.seed}
        a = run_worker(args, "a") if args.a_n else None
        if a:
            rows.write({"part": "a", **setting, "repeats": args.repeats, **a})
            print(f"(a) done: bare {a['times']['bare']:.2f} s", flush=True)
        b = run_worker(args, "b") if args.b_n else None
        if b:
            rows.write({"part": "b", **setting, **b})
        report(a, b)


if __name__ == "__main__":
    main()
