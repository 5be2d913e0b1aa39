"""Curation's selection and writing, each against its peer, in one run.

    python bench/bench_curate.py                     # retrieval 200k pool, writing 4,000 samples
    python bench/bench_curate.py --pool 50000 --samples 1000          # quicker

(a) Retrieval (`pipeline.stages.curate.sample_based`, DINOv2's N nearest pool images per seed)
    through the IVF index the stage builds above `curate.retrieval_ivf_min_size`, against the
    exact flat index on the same embeddings: seeds/s and recall@N of IVF (the share of flat's
    neighbours it returns). Synthetic 384-d float16 L2-normalised embeddings around random
    centres on the sphere; the seeds are perturbed pool points.
(b) Writing (`pipeline.stages.write.write_curated_shard`: offset reads from the crawl tars,
    hash check, JSON with curation fields, atomic tar + done marker) against copying the same
    members with `tarfile` alone (extractfile + addfile, no check, no marker), same shuffled
    order, same shard size, warm page cache for both; alternating, best of `--rounds`.

Each part's row is appended to `--jsonl` (default runs/bench/curate.jsonl) as it ends.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from _rows import RowWriter, add_jsonl_arg
from PIL import Image

from pipeline.config import SemDedupConfig
from pipeline.shardio import TarSink
from pipeline.stages.curate import sample_based
from pipeline.stages.semdedup import build_index
from pipeline.stages.write import plan_shards, tar_member_index, write_curated_shard


def embeddings(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + 0.08 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def bench_retrieval(args) -> dict:
    pool = embeddings(args.pool, 384, 2000, 0)
    rng = np.random.default_rng(1)
    seeds = pool[rng.choice(args.pool, args.seeds, replace=False)].astype(np.float32)
    seeds += 0.05 * rng.standard_normal(seeds.shape).astype(np.float32)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    out = {}
    for kind in ("flat", "ivf"):
        cfg = SemDedupConfig(index=kind, ivf_nprobe=args.nprobe)
        started = time.perf_counter()
        index = build_index([pool], cfg, args.pool)
        built = time.perf_counter() - started
        started = time.perf_counter()
        raw = index.search(seeds, args.per_seed)[1]
        rows, _, _, collisions = sample_based(index, seeds, args.per_seed)
        seconds = time.perf_counter() - started
        out[kind] = {"build_s": round(built, 2), "seeds_per_s": round(len(seeds) / seconds, 1),
                     "retrieved": int(len(rows)), "collisions": collisions, "neighbours": raw}  # fmt: skip
    flat, ivf = out["flat"].pop("neighbours"), out["ivf"].pop("neighbours")
    hits = sum(len(set(a) & set(b)) for a, b in zip(flat.tolist(), ivf.tolist()))
    out["ivf"]["recall_at_n"] = round(hits / flat.size, 4)
    return out


def make_crawl_tars(root: Path, samples: int, per_tar: int) -> tuple[dict, list[str]]:
    rng = np.random.default_rng(0)
    sources, keys = {}, []
    for t in range(0, samples, per_tar):
        tar = root / f"{t // per_tar:05d}.tar"
        sink = TarSink(tar)
        for i in range(t, min(t + per_tar, samples)):
            img = Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            key = f"{t // per_tar:05d}{i - t:04d}"
            meta = {"key": key, "width": 320, "height": 256,
                    "jpg_sha256": hashlib.sha256(buf.getvalue()).hexdigest()}  # fmt: skip
            sink.add(key, buf.getvalue(), meta)
            sources[key] = tar
            keys.append(key)
        sink.commit()
    return sources, keys


def tarfile_copy(shards, sources: dict, out: Path) -> None:
    handles = {t: tarfile.open(t) for t in set(sources.values())}
    try:
        for i, entries in enumerate(shards):
            with tarfile.open(out / f"{i:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as sink:
                for _, src in entries:
                    tar = handles[sources[src]]
                    for ext in ("jpg", "json"):
                        member = tar.getmember(f"{src}.{ext}")
                        sink.addfile(member, tar.extractfile(member))
    finally:
        for h in handles.values():
            h.close()


def bench_writing(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_curate_"))
    try:
        crawl = root / "crawl"
        crawl.mkdir()
        sources, keys = make_crawl_tars(crawl, args.samples, 1000)
        shards = plan_shards(keys, [1] * len(keys), args.shard_size, 0)
        index = {t: tar_member_index(t) for t in set(sources.values())}
        fields = {k: {"cluster_l1": 3, "selected_by": "balanced"} for k in keys}
        times = {"dinoforge": [], "tarfile": []}
        for r in range(args.rounds):
            for name in ("dinoforge", "tarfile") if r % 2 == 0 else ("tarfile", "dinoforge"):
                out = root / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                started = time.perf_counter()
                if name == "tarfile":
                    tarfile_copy(shards, sources, out)
                else:
                    for i, entries in enumerate(shards):
                        write_curated_shard(entries, out / f"{i:06d}.tar", sources, index, fields)
                times[name].append(time.perf_counter() - started)
        best = {k: round(len(keys) / min(v), 1) for k, v in times.items()}
        return {"samples": len(keys), "samples_per_s": best,
                "ratio": round(best["dinoforge"] / best["tarfile"], 3)}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, default=2000)
    parser.add_argument("--per-seed", type=int, default=4)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    add_jsonl_arg(parser, "curate")
    args = parser.parse_args()
    rows = RowWriter.from_args(args, "curate")
    retrieval = bench_retrieval(args)
    rows.write({"part": "retrieval", "pool": args.pool, "seeds": args.seeds,
                "per_seed": args.per_seed, "nprobe": args.nprobe, **retrieval})  # fmt: skip
    writing = bench_writing(args)
    rows.write({"part": "writing", "shard_size": args.shard_size, "rounds": args.rounds,
                **writing})  # fmt: skip
    result = {"retrieval": retrieval, "writing": writing}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
