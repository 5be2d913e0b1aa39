"""The curation stages on Ray: cluster, curate, write (the runner layer, with pipeline/runner.py).

- cluster: every level's centroids are trained on the driver from a sample (FAISS's
  points-per-centroid rule); the level-1 assignment of the whole kept pool runs in Ray tasks, one
  per embedding part, each memory-mapping its own file: no process holds every embedding. The
  tasks hold `cluster.gpus_per_task` GPUs when the cluster has them (pipeline/resources.py).
- curate: the seed images are embedded by the embed stage's actors (cached under
  RUN/embed/seeds/); retrieval and balanced sampling run on the driver over the kept pool.
- write: one Ray task per curated shard copies each sample's JPEG and JSON out of the crawl tars
  by offset (no re-encoding) and writes its done marker last; then the manifest and summary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import plan
from pipeline import resources as res
from pipeline.config import PipelineConfig
from pipeline.layout import (
    CRAWL_SCHEMA,
    RunLayout,
    clear_temporaries,
    curated_shard_name,
    shard_of_key,
    token,
)
from pipeline.runner import cluster_gpus, log_placement, where
from pipeline.shardio import read_stats, write_npy_atomic, write_parquet_atomic, write_stats
from pipeline.stages import cluster as cl
from pipeline.stages.curate import RowSubset
from pretrain.configtools import ConfigError, to_object

log = logging.getLogger(__name__)


def kept_pool(layout: RunLayout) -> tuple[list[RowSubset], list[str], list[Path], list]:
    """The pool curation draws from: every embedded sample semantic dedup keeps, as lazy row
    subsets of the memory-mapped parts; (parts, keys, npy paths, kept rows per part)."""
    from pipeline.stages.embed import read_part

    table = pq.read_table(layout.semantic_parquet, columns=["key", "reason"])
    kept = set(table.filter(pc.is_null(table["reason"]))["key"].to_pylist())
    parts, keys, paths, rows = [], [], [], []
    for part in layout.embed_done():
        feats, part_keys = read_part(part)
        mine = np.array([i for i, k in enumerate(part_keys) if k in kept], np.int64)
        if not len(mine):
            continue
        parts.append(RowSubset(feats, mine))
        keys += [part_keys[i] for i in mine]
        paths.append(part.npy)
        rows.append(mine)
    if not keys:
        raise ValueError("curation: the pool is empty (semantic dedup kept no sample)")
    return parts, keys, paths, rows


def _input_token_of(layout: RunLayout, stage: str) -> str | None:
    """What a finished stage was computed from (content, not time): a later stage's inputs."""
    return (plan.read_state(layout, stage) or {}).get("input_token")


def _pool_token(layout: RunLayout) -> str | None:
    return _input_token_of(layout, "semdedup")


# -- cluster ----------------------------------------------------------------------------------


@ray.remote
def _assign_task(centroids: np.ndarray, path: str, rows: np.ndarray, chunk: int, use_gpu: bool,
                 float16: bool):  # fmt: skip
    """Nearest centroids of one embedding part's kept rows, and where it ran. FAISS goes to the
    GPU only if this task was given one (a task that asked for none still sees its node's)."""
    place = where()
    gpu = use_gpu and bool(place["gpu_ids"])
    part = RowSubset(np.load(path, mmap_mode="r"), rows)
    labels, distances = cl.assign_parts(centroids, [part], chunk, gpu, float16)
    return labels, distances, {**place, "faiss_gpu": cl.gpu_available(gpu)}


def assign_pool(centroids: np.ndarray, paths: list[Path], rows: list, ccfg, gpus: int):
    """(labels, distances, where each task ran) of the whole pool: one Ray task per embedding
    part, asking for GPUs as ``resources.assign_placement`` says on a cluster of ``gpus``."""
    place = res.assign_placement(ccfg, gpus)
    task = _assign_task.options(**place.options)
    done = ray.get([task.remote(centroids, str(p), r, ccfg.assign_chunk, place.gpu,
                                ccfg.gpu_float16) for p, r in zip(paths, rows)])  # fmt: skip
    places = [d[2] for d in done]
    log_placement("cluster", places)
    return np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done]), places


def _cluster_token(cfg: PipelineConfig, layout: RunLayout) -> str:
    return token(plan.stage_settings(cfg, "cluster"), _pool_token(layout))


def run_cluster(cfg: PipelineConfig, layout: RunLayout, total_rows: int, previous) -> dict:
    input_token = _cluster_token(cfg, layout)
    if plan.is_done(previous, input_token) and layout.assignments.exists():
        log.info("cluster: up to date with the pool, skipped")
        return {"skipped": True, "input_token": input_token}
    ccfg = to_object(cfg.cluster)
    parts, keys, paths, rows = kept_pool(layout)
    n = cl.check_inputs(parts, ccfg)
    levels: list[cl.Level] = []
    for level, k in enumerate(ccfg.levels, start=1):
        inputs = parts if level == 1 else [levels[-1].centroids]
        centroids = cl.train_level(cl.training_sample(inputs, k, ccfg, level), k, ccfg, level)
        if level == 1:  # the whole pool: one Ray task per embedding part
            labels, distances, _ = assign_pool(centroids, paths, rows, ccfg, cluster_gpus())
        else:
            labels, distances = cl.assign_parts(centroids, inputs, ccfg.assign_chunk, ccfg.use_gpu,
                                                ccfg.gpu_float16)  # fmt: skip
        levels.append(cl.Level(centroids, labels, distances))
        log.info("cluster: level %d, %d clusters over %d inputs", level, k, len(labels))
    _write_levels(layout, levels, keys)
    from pipeline.stages.curate import balance_report

    balance = {f"l{t}": balance_report(cl.labels_at(levels, t)) for t in range(1, len(levels) + 1)}
    write_stats({"pool": n, "levels": balance}, layout.clusters_dir / "summary.json")
    return {"pool": n, "levels": list(ccfg.levels), "balance": balance,
            "input_token": input_token}  # fmt: skip


def _write_levels(layout: RunLayout, levels: list, keys: list[str]) -> None:
    for t, level in enumerate(levels, start=1):
        d = layout.level_dir(t)
        d.mkdir(parents=True, exist_ok=True)
        write_npy_atomic(level.centroids, d / "centroids.npy")
        write_npy_atomic(level.assignment, d / "assignment.npy")
        write_npy_atomic(level.distances, d / "distances.npy")
    columns = {"key": pa.array(keys, pa.string())}
    for t in range(1, len(levels) + 1):
        columns[f"cluster_l{t}"] = pa.array(cl.labels_at(levels, t), pa.int64())
    columns["distance"] = pa.array(levels[0].distances, pa.float32())
    write_parquet_atomic(pa.table(columns), layout.assignments)


def read_levels(layout: RunLayout) -> list:
    levels, t = [], 1
    while (d := layout.level_dir(t)).is_dir():
        levels.append(cl.Level(np.load(d / "centroids.npy"), np.load(d / "assignment.npy"),
                               np.load(d / "distances.npy")))  # fmt: skip
        t += 1
    return levels


# -- curate -----------------------------------------------------------------------------------


def run_curate(cfg: PipelineConfig, layout: RunLayout, total_rows: int, previous) -> dict:
    from pipeline.stages import curate as cu

    seed_parts = _embed_seeds(cfg, layout)
    input_token = token(plan.stage_settings(cfg, "curate"), _pool_token(layout),
                        [read_stats(p.done)["token"] for p in seed_parts],
                        _input_token_of(layout, "cluster"))  # fmt: skip
    if plan.is_done(previous, input_token) and layout.selection.exists():
        log.info("curate: up to date, skipped")
        return {"skipped": True, "input_token": input_token}
    if _input_token_of(layout, "cluster") != _cluster_token(cfg, layout):
        # the clusters index the pool's rows: those of another pool would label the wrong images
        raise ConfigError(
            f"{layout.root}: the cluster stage's output was computed from another pool (the "
            "crawl, embed or semantic dedup ran again since): add cluster to stages "
            "(stages=[cluster,curate,...])"
        )
    ccfg = to_object(cfg.curate)
    parts, keys, _, _ = kept_pool(layout)
    levels = read_levels(layout)
    n = len(keys)
    selected_by = np.full(n, None, object)
    query_key = np.full(n, None, object)
    query_sim = np.full(n, np.nan, np.float32)
    multiplicity = np.zeros(n, np.int32)
    info: dict[str, Any] = {"pool": n, "mode": cu.resolved_mode(ccfg)}
    if info["mode"] in ("retrieval", "both"):
        info["retrieval"] = _retrieve(ccfg, parts, levels, seed_parts, selected_by, query_key,
                                      query_sim, multiplicity)  # fmt: skip
    retrieved = int((multiplicity > 0).sum())
    if info["mode"] in ("balanced", "both"):
        from pipeline.stages.sampling import balanced_sample

        remaining = ccfg.target_size - retrieved
        if remaining > 0:
            idx, mult, binfo = balanced_sample(levels, remaining, ccfg,
                                               exclude=np.nonzero(multiplicity > 0)[0])  # fmt: skip
            selected_by[idx], multiplicity[idx] = "balanced", mult
            info["balanced"] = {k: v for k, v in binfo.items() if np.isscalar(v)}
    if info["mode"] == "random":
        rows = cu.uniform_sample(n, ccfg.target_size, ccfg.seed)
        selected_by[rows], multiplicity[rows] = "random", 1
    chosen = np.nonzero(multiplicity > 0)[0]
    columns = {
        "key": [keys[i] for i in chosen],
        "selected_by": selected_by[chosen].tolist(),
        "query_key": query_key[chosen].tolist(),
        "query_distance": [None if np.isnan(v) else float(1 - v) for v in query_sim[chosen]],
        "multiplicity": multiplicity[chosen].tolist(),
    }
    for t in range(1, len(levels) + 1):
        columns[f"cluster_l{t}"] = cl.labels_at(levels, t)[chosen].tolist()
    columns["distance"] = levels[0].distances[chosen].tolist()
    if ccfg.include_seeds:
        info["seeds_included"] = _add_seeds(layout, levels, seed_parts, columns)
    layout.curated_dir.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(_selection_table(columns, len(levels)), layout.selection)
    info.update(selected=int(len(columns["key"])), samples=int(sum(columns["multiplicity"])),
                by_mode={m: int(multiplicity[selected_by == m].sum())
                         for m in ("retrieval", "cluster_retrieval", "balanced", "random")})  # fmt: skip
    log.info("curate: %s", info)
    return {**info, "input_token": input_token}


def _selection_table(columns: dict, n_levels: int) -> pa.Table:
    types = {"key": pa.string(), "selected_by": pa.string(), "query_key": pa.string(),
             "query_distance": pa.float32(), "multiplicity": pa.int32(), "distance": pa.float32(),
             **{f"cluster_l{t}": pa.int64() for t in range(1, n_levels + 1)}}  # fmt: skip
    return pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})


def _add_seeds(layout: RunLayout, levels: list, seed_parts: list, columns: dict) -> int:
    """curate.include_seeds: every seed image that crawled fine joins the selection as it is
    (selected_by = seed), with its clusters by nearest centroid."""
    from pipeline.stages.embed import read_part

    feats, keys = read_part(seed_parts[0], mmap=False)
    labels, distances = cl.assign(levels[0].centroids, np.asarray(feats, np.float32))
    composed = [labels]
    for level in levels[1:]:
        composed.append(level.assignment[composed[-1]])
    for i, key in enumerate(keys):
        columns["key"].append(key)
        columns["selected_by"].append("seed")
        columns["query_key"].append(None)
        columns["query_distance"].append(None)
        columns["multiplicity"].append(1)
        for t, lab in enumerate(composed, start=1):
            columns[f"cluster_l{t}"].append(int(lab[i]))
        columns["distance"].append(float(distances[i]))
    return len(keys)


def _retrieve(ccfg, parts, levels, seed_parts, selected_by, query_key, query_sim, mult) -> dict:
    from pipeline.stages import curate as cu
    from pipeline.stages.embed import read_part
    from pipeline.stages.semdedup import build_index, index_kind

    seeds, seed_keys = [], []
    for part in seed_parts:
        feats, k = read_part(part)
        seeds.append(np.asarray(feats, np.float32))
        seed_keys += k
    seeds = np.concatenate(seeds)
    if seeds.shape[1] != parts[0].shape[1]:
        raise ValueError(f"curate.seeds embedded with dimension {seeds.shape[1]}, the pool "
                         f"{parts[0].shape[1]}: the same model must embed both")  # fmt: skip
    kind = cu.retrieval_kind(ccfg, len(seeds))
    if kind == "sample":
        from pipeline.config import SemDedupConfig

        n = sum(p.shape[0] for p in parts)
        icfg = SemDedupConfig(index="auto", ivf_min_size=ccfg.retrieval_ivf_min_size,
                              pq_m=ccfg.retrieval_pq_m, use_gpu=ccfg.use_gpu,
                              gpu_float16=ccfg.gpu_float16)  # fmt: skip
        index = build_index(parts, icfg, n)
        exact = parts if index_kind(icfg, n) == "ivfpq" else None  # PQ cosines are biased
        rows, seed_rows, sims, collisions = cu.sample_based(index, seeds, ccfg.per_seed, exact)
        selected_by[rows], mult[rows] = "retrieval", 1
        query_key[rows] = np.array(seed_keys, object)[seed_rows]
        query_sim[rows] = sims
        return {"kind": kind, "seeds": len(seeds), "retrieved": int(len(rows)),
                "collisions": collisions}  # fmt: skip
    seed_labels, _ = cl.assign(levels[0].centroids, seeds)
    rows, _, info = cu.cluster_based(seed_labels, levels[0].assignment, levels[0].distances, ccfg)
    selected_by[rows], mult[rows] = "cluster_retrieval", 1
    return {"kind": kind, "seeds": len(seeds), "retrieved": int(len(rows)), **info}


def seed_source_kind(spec: str) -> str:
    """urls (a URL list file), folder, or tars (a glob)."""
    from pipeline.sources import URL_FORMATS

    path = Path(spec)
    if path.is_file() and path.suffix.lower() in URL_FORMATS:
        return "urls"
    return "folder" if path.is_dir() else "tars"


@ray.remote
def _crawl_seeds_task(table, crawl_dir: str, crawl, kind: str) -> dict:
    from pipeline.stages.crawl import crawl_shard

    return crawl_shard(table, 0, Path(crawl_dir), crawl, kind)


def seed_shard(layout: RunLayout):
    """The seed set in crawl format: RUN/seeds/crawl/00000.{tar,parquet,stats.json}."""
    from pipeline.layout import crawl_shard_files

    return crawl_shard_files(layout.seed_crawl_dir, 0)


def _crawl_seeds(cfg: PipelineConfig, layout: RunLayout) -> None:
    """Seed images (a folder, tars or a URL list) go through the crawl's own checks, resize and
    re-encoding once, so that they are embedded (and written, with curate.include_seeds) like
    the pool. Their keys are crawl keys of 15 characters, apart from the pool's."""
    import dataclasses

    from pipeline.config import InputConfig
    from pipeline.sources import iter_shards, source_fingerprint

    shard = seed_shard(layout)
    spec, kind = cfg.curate.seeds, seed_source_kind(cfg.curate.seeds)
    source = InputConfig(kind=kind, **{kind: spec})
    done = shard.stats.exists()
    # beside the crawl's own files, so that the seed embedding's token (the stats) is unchanged
    source_file = shard.stats.with_name("source.json")
    tables = [t for _, t in iter_shards(source, 1 << 30)]
    if not tables:
        raise ConfigError(f"curate.seeds: {spec} holds no images")
    table = pa.concat_tables(tables)
    fingerprint = {"source_fingerprint": source_fingerprint(table, kind)}
    if done:
        # no source.json: crawled before fingerprints were kept (or killed right after): as is
        if not source_file.exists() or read_stats(source_file) == fingerprint:
            write_stats(fingerprint, source_file)
            return
        log.info("curate: the seed set %s changed since it was crawled: crawling it again", spec)
        for path in (shard.stats, shard.parquet, shard.tar):  # nothing of the old set is reused
            path.unlink(missing_ok=True)
    shard.tar.parent.mkdir(parents=True, exist_ok=True)
    clear_temporaries(shard.tar.parent)
    crawl = dataclasses.replace(to_object(cfg.crawl), shard_size=1 << 30)
    stats = ray.get(_crawl_seeds_task.remote(table, str(shard.tar.parent), crawl, kind))
    write_stats(fingerprint, source_file)
    log.info("curate: %d seed images of %d ready (%s)", stats["successes"], stats["count"], spec)


def _embed_seeds(cfg: PipelineConfig, layout: RunLayout) -> list:
    """Embed the seed set once (RUN/embed/seeds/set00) with the pool's model: it is a crawl
    shard by then, embedded exactly as the pool's shards are."""
    from pipeline.runner import embed_identity, on_embedders
    from pipeline.stages.embed import part_intact

    if not cfg.curate.seeds:
        return []
    layout.seed_embed_dir.mkdir(parents=True, exist_ok=True)
    clear_temporaries(layout.seed_embed_dir)
    _crawl_seeds(cfg, layout)
    shard = seed_shard(layout)
    tok = token(embed_identity(cfg), cfg.curate.seeds, shard.stats.read_text())
    part = layout.embed_part("set00", seeds=True)
    if not part_intact(part, tok):
        for marker, _ in on_embedders(cfg, "embed_shard", [(shard, set(), part, tok)]):
            log.info("curate: embedded %d seed images", marker["count"])
    return [part]


# -- write ------------------------------------------------------------------------------------


@ray.remote(max_retries=2)
def _write_task(entries, out_tar: str, sources: dict, member_index: dict, fields: dict) -> dict:
    from pipeline.stages.write import write_curated_shard

    return write_curated_shard(entries, Path(out_tar), sources, member_index, fields)


def run_write(cfg: PipelineConfig, layout: RunLayout, total_rows: int, previous) -> dict:
    """Curated shards in a seeded shuffled order, then manifest.parquet and summary.json."""
    from pipeline.stages import write as wr

    input_token = token(plan.stage_settings(cfg, "write"), _input_token_of(layout, "curate"))
    if plan.is_done(previous, input_token) and layout.curated_manifest.exists():
        log.info("write: up to date with the selection, skipped")
        return {"skipped": True, "input_token": input_token}
    selection = pq.read_table(layout.selection)
    fields = _curation_fields(layout, selection)
    keys = selection["key"].to_pylist()
    shards = wr.plan_shards(keys, selection["multiplicity"].to_pylist(), cfg.curate.shard_size,
                            cfg.curate.seed)  # fmt: skip
    out_dir = layout.curated_shards_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    wr.clear_partial(out_dir)
    seeds = {r["key"] for r in selection.to_pylist() if r["selected_by"] == "seed"}
    sources = {k: str(seed_shard(layout).tar if k in seeds else layout.crawl_shard(shard_of_key(k)).tar)
               for k in keys}  # fmt: skip
    tar_index = {t: wr.tar_member_index(Path(t)) for t in sorted(set(sources.values()))}
    refs, skipped = {}, 0
    for i, entries in enumerate(shards):
        tar = layout.curated_shard(i)
        need = {src for _, src in entries}
        mine = {k: fields[k] for k in need}
        if wr.shard_done(tar, entries, mine):
            skipped += 1
            continue
        srcs = {k: sources[k] for k in need}
        index = {t: tar_index[t] for t in set(srcs.values())}
        refs[_write_task.remote(entries, str(tar), srcs, index, mine)] = i
    failed = []
    for ref, i in refs.items():
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            log.error("curated shard %06d failed, rerun to redo it: %s", i, exc)
            failed.append(i)
    if failed:
        return {"unfinished": True, "failed_shards": failed}
    stale = wr.remove_beyond(out_dir, len(shards))
    if stale:
        log.info("write: removed %d files of shards beyond this selection's %d", len(stale),
                 len(shards))  # fmt: skip
    tars = [layout.curated_shard(i) for i in range(len(shards))]
    manifest = _manifest_table(layout, shards, fields)
    write_parquet_atomic(manifest, layout.curated_manifest)
    from pipeline.shardio import write_train_shard_list

    write_train_shard_list(layout, tars)
    summary = curation_summary(layout, manifest, tars)
    write_stats(summary, layout.curated_summary)
    return {"shards": len(tars), "written": len(refs), "skipped_shards": skipped,
            "samples": manifest.num_rows, "input_token": input_token}  # fmt: skip


def _curation_fields(layout: RunLayout, selection: pa.Table) -> dict[str, dict]:
    """Per selected key: its clusters, distance and how it was selected (JSON-ready)."""
    out = {}
    for row in selection.to_pylist():
        f = dict(row)
        f["source_key"] = f.pop("key")
        out[row["key"]] = f
    return out


def _manifest_table(layout: RunLayout, shards: list, fields: dict[str, dict]) -> pa.Table:
    """One row per curated sample: the crawl columns of its source, then the curation columns."""
    from pipeline.stages.write import parse_output_key

    wanted = {src for entries in shards for _, src in entries}
    crawl_rows = {}
    seeds = seed_shard(layout)
    for shard in layout.crawl_done() + ([seeds] if seeds.stats.exists() else []):
        table = pq.read_table(shard.parquet)
        table = table.filter(pc.is_in(table["key"], pa.array(sorted(wanted), pa.string())))
        crawl_rows.update({r["key"]: r for r in table.to_pylist()})
    rows = []
    for i, entries in enumerate(shards):
        for out_key, src in entries:
            row = {**crawl_rows[src], **fields[src]}
            row.update(key=out_key, source_key=src, shard=curated_shard_name(i),
                       repeat_index=parse_output_key(out_key)[1])  # fmt: skip
            rows.append(row)
    names = list(dict.fromkeys(name for row in rows for name in row))
    typed = {f.name: f.type for f in CRAWL_SCHEMA}  # pHash is uint64: no inference
    return pa.table({n: pa.array([r.get(n) for r in rows], typed.get(n)) for n in names})


def curation_summary(layout: RunLayout, manifest: pa.Table, tars: list[Path]) -> dict:
    """Counts per stage and per reason, cluster balance before / after, the shard list."""
    from pipeline.manifest import summary as crawl_summary
    from pipeline.stages.curate import balance_report

    crawl = crawl_summary(layout.root)
    assignments = pq.read_table(layout.assignments)
    levels = [c for c in assignments.column_names if c.startswith("cluster_l")]
    mult = np.asarray(manifest["multiplicity"].to_numpy(zero_copy_only=False), np.float64)
    per_sample = np.ones(manifest.num_rows)
    balance = {}
    for column in levels:
        before = assignments[column].to_numpy()
        after = manifest[column].to_numpy()
        balance[column] = {"pool": balance_report(before),
                           "curated": balance_report(after, per_sample)}  # fmt: skip
    by_mode: dict[str, int] = {}
    for mode in manifest["selected_by"].to_pylist():
        by_mode[mode] = by_mode.get(mode, 0) + 1
    return {
        "crawled": crawl["rows"], "crawl_by_status": crawl["by_status"],
        "crawl_by_error": crawl["by_error"], "dedup": crawl.get("dedup"),
        "embed": crawl.get("embed"), "semdedup": crawl.get("semdedup"),
        "pool": assignments.num_rows, "curated_samples": manifest.num_rows,
        "curated_images": int(len(set(manifest["source_key"].to_pylist()))),
        "max_multiplicity": int(mult.max(initial=0)), "selected_by": by_mode,
        "balance": balance,
        "shards": [str(t.relative_to(layout.root)) for t in tars],
    }  # fmt: skip
