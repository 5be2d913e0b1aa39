"""Inspection of a run directory: summary, shards, failures, validate (CLI: pipeline/cli.py).

Each function returns a JSON-serialisable dict; ``render`` turns it into text for people.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline import plan
from pipeline.layout import RunLayout
from pipeline.shardio import iter_tar_samples, read_stats
from pipeline.stages import STAGE_NAMES

SIZE_BINS = (0, 256, 512, 1024, 2048, 4096)


def _shard_files(run_dir: Path) -> list[tuple[int, Path, Path, Path]]:
    return [(s.index, s.tar, s.parquet, s.stats) for s in RunLayout(run_dir).crawl_done()]


def shards(run_dir: Path) -> dict:
    rows = []
    for index, tar, _, stats_path in _shard_files(run_dir):
        stats = read_stats(stats_path)
        rows.append({
            "shard": index, "count": stats["count"], "successes": stats["successes"],
            "failures": stats["failures"], "bytes_downloaded": stats["bytes_downloaded"],
            "tar_bytes": tar.stat().st_size if tar.exists() else 0, "duration_s": stats["duration_s"],
        })  # fmt: skip
    report = {"shards": rows}
    curated_dir = RunLayout(run_dir).curated_shards_dir
    if curated_dir.is_dir():
        from pipeline.stages.write import read_done

        report["curated_shards"] = [
            {"shard": tar.name, "count": (read_done(tar) or {}).get("count"),
             "tar_bytes": tar.stat().st_size, "done": read_done(tar) is not None}
            for tar in sorted(curated_dir.glob("*.tar"))
        ]  # fmt: skip
    return report


def summary(run_dir: Path) -> dict:
    totals: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    histogram = collections.Counter()
    start, end, downloaded = None, None, 0
    for _, _, parquet, stats_path in _shard_files(run_dir):
        stats = read_stats(stats_path)
        totals.update(stats["status"])
        errors.update(stats["errors"])
        downloaded += stats["bytes_downloaded"]
        start = min(start or stats["started_at"], stats["started_at"])
        end = max(end or 0, stats["started_at"] + stats["duration_s"])
        table = pq.read_table(parquet, columns=["status", "original_width", "original_height"])
        ok = table.filter(pc.equal(table["status"], "success"))
        for w, h in zip(ok["original_width"].to_pylist(), ok["original_height"].to_pylist()):
            histogram[_size_bin(max(w, h))] += 1
    rows = sum(totals.values())
    wall = (end - start) if start is not None else 0.0
    report = {
        "shards_done": len(_shard_files(run_dir)),
        "rows": rows,
        "by_status": dict(totals),
        "by_error": dict(errors.most_common()),
        "success_rate": round(totals.get("success", 0) / rows, 4) if rows else 0.0,
        "bytes_downloaded": downloaded,
        "crawl_wall_s": round(wall, 2),
        "urls_per_s": round(rows / wall, 1) if wall > 0 else None,
        "original_size_histogram": {k: histogram[k] for k in _bin_labels() if histogram[k]},
    }
    layout = RunLayout(run_dir)
    if layout.dedup_summary.exists():
        report["dedup"] = json.loads(layout.dedup_summary.read_text())
    report.update(_curation_counts(layout))
    if layout.curated_summary.exists():
        curated = json.loads(layout.curated_summary.read_text())
        report["curated"] = {
            k: curated[k]
            for k in ("pool", "curated_samples", "curated_images", "selected_by", "shards")
            if k in curated
        }
    return report


def stage_counts(report: dict) -> dict[str, int | None]:
    """The count of each stage, in pipeline order, from a ``summary`` report (None where the
    stage has not run): the gallery's table and the demo's closing table."""
    dedup, sem = report.get("dedup") or {}, report.get("semdedup") or {}
    curated = report.get("curated") or {}
    counts = {
        "urls": report["rows"],
        "fetched": report["by_status"].get("success", 0),
        "exact_duplicates": dedup.get("exact_duplicates"),
        "near_duplicates": dedup.get("near_duplicates"),
        "embedded": (report.get("embed") or {}).get("images"),
        "semantic_duplicates": sem.get("semantic_duplicates"),
        "eval_contaminated": sem.get("eval_contaminated"),
        "kept_pool": sem.get("kept"),
        "curated_samples": curated.get("curated_samples"),
    }
    for how, n in sorted((curated.get("selected_by") or {}).items()):
        counts[f"selected_by_{how}"] = n
    return counts


def _curation_counts(layout: RunLayout) -> dict:
    """Stage states, embedding counts, semantic dedup and decontamination counts."""
    out: dict = {"stages": {}}
    for stage in STAGE_NAMES:
        state = plan.read_state(layout, stage)
        if state:
            out["stages"][stage] = state["state"]
    parts = layout.embed_done()
    if parts:
        markers = [read_stats(p.done) for p in parts]
        out["embed"] = {
            "shards": len(parts),
            "images": sum(m["count"] for m in markers),
            "undecodable": sum(m["failures"] for m in markers),
            "dim": markers[0]["dim"],
            "backbone": ((plan.read_state(layout, "embed") or {}).get("summary") or {}).get(
                "backbone"
            ),
        }
    if layout.semantic_summary.exists():
        out["semdedup"] = json.loads(layout.semantic_summary.read_text())
    for stage in ("cluster", "curate"):
        state = plan.read_state(layout, stage)
        if state and state.get("summary"):
            out[stage] = {k: v for k, v in state["summary"].items() if k != "duration_s"}
    return out


def _bin_labels() -> list[str]:
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(SIZE_BINS, SIZE_BINS[1:])]
    return labels + [f">={SIZE_BINS[-1]}"]


def _size_bin(side: int) -> str:
    for lo, hi in zip(SIZE_BINS, SIZE_BINS[1:]):
        if lo <= side < hi:
            return f"{lo}-{hi - 1}"
    return f">={SIZE_BINS[-1]}"


def failures(run_dir: Path, examples: int = 3) -> dict:
    counts: collections.Counter[str] = collections.Counter()
    samples: dict[str, list[dict]] = collections.defaultdict(list)
    for _, _, parquet, _ in _shard_files(run_dir):
        table = pq.read_table(
            parquet, columns=["key", "url", "status", "error_type", "error_message"]
        )
        for row in table.filter(pc.not_equal(table["status"], "success")).to_pylist():
            counts[row["error_type"]] += 1
            if len(samples[row["error_type"]]) < examples:
                samples[row["error_type"]].append(
                    {"key": row["key"], "url": row["url"], "error_message": row["error_message"]}
                )
    return {
        "failures": [
            {"error_type": kind, "count": n, "examples": samples[kind]}
            for kind, n in counts.most_common()
        ]
    }


def validate(run_dir: Path) -> dict:
    """Every tar against its parquet: same keys, count, image sizes and metadata hashes."""
    problems: list[str] = []
    checked = 0
    for index, tar, parquet, stats_path in _shard_files(run_dir):
        name = f"{index:05d}"
        if not tar.exists() or not parquet.exists():
            problems.append(f"{name}: tar or parquet missing")
            continue
        problems += _validate_shard(name, tar, parquet, read_stats(stats_path))
        checked += 1
    report = {"ok": not problems, "shards_checked": checked, "problems": problems}
    layout = RunLayout(run_dir)
    if layout.curated_manifest.exists():
        from pipeline.stages.write import validate_curated

        rows = pq.read_table(layout.curated_manifest).to_pylist()
        columns = [c for c in (rows[0] if rows else {}) if c.startswith("cluster_l")] + [
            "distance",
            "selected_by",
            "query_key",
            "query_distance",
            "multiplicity",
        ]
        problems_curated = validate_curated(layout.curated_shards_dir, rows, columns)
        curated = [f"curated: {p}" for p in problems_curated]
        report.update(curated_shards_checked=len(list(layout.curated_shards_dir.glob("*.tar"))),
                      curated_samples=len(rows), ok=not (problems or curated),
                      problems=problems + curated)  # fmt: skip
    return report


def clusters(run_dir: Path) -> dict:
    """Cluster balance per level: the kept pool, and the curated set when written."""
    from pipeline.stages.curate import balance_report

    layout = RunLayout(run_dir)
    if not layout.assignments.exists():
        return {"levels": {}, "note": "no clusters yet: run the cluster stage"}
    pool = pq.read_table(layout.assignments)
    curated = pq.read_table(layout.curated_manifest) if layout.curated_manifest.exists() else None
    out = {}
    for column in (c for c in pool.column_names if c.startswith("cluster_l")):
        out[column] = {"pool": balance_report(pool[column].to_numpy())}
        if curated is not None:
            out[column]["curated"] = balance_report(curated[column].to_numpy())
    return {"levels": out}


def _validate_shard(name: str, tar: Path, parquet: Path, stats: dict) -> list[str]:
    problems = []
    table = pq.read_table(parquet)
    if table.num_rows != stats["count"]:
        problems.append(f"{name}: parquet has {table.num_rows} rows, stats say {stats['count']}")
    expected = {r["key"]: r for r in table.to_pylist() if r["status"] == "success"}
    try:
        samples = list(iter_tar_samples(tar))
        with tarfile.open(tar) as archive:  # a sample appended again folds into one above
            members = collections.Counter(m.name for m in archive if m.isfile())
    except Exception as exc:
        return problems + [f"{name}: unreadable tar: {exc}"]
    for member, times in sorted(members.items()):
        if times > 1:
            problems.append(f"{name}: tar member {member} appears {times} times")
        base = member.rpartition("/")[2]
        stem, dot, _ = base.partition(".")
        if not (stem and dot) or base.startswith("__"):  # the shared reader's rule
            # no sample field (WebDataset readers skip it): the crawl never writes one
            problems.append(f"{name}: tar member {member} is no KEY.field sample member")
    found = dict(samples)
    for key in sorted(set(expected) - set(found)):
        problems.append(f"{name}: {key} in parquet but not in tar")
    for key in sorted(set(found) - set(expected)):
        problems.append(f"{name}: {key} in tar but not a success in parquet")
    for key in sorted(set(found) & set(expected)):
        problems += _validate_sample(name, key, found[key], expected[key])
    return problems


def _validate_sample(name: str, key: str, files: dict[str, bytes], row: dict) -> list[str]:
    if set(files) != {"jpg", "json"}:
        return [f"{name}: {key} has members {sorted(files)}, expected jpg + json"]
    try:
        meta = json.loads(files["json"])
        with Image.open(io.BytesIO(files["jpg"])) as img:
            img.load()
            size = img.size
    except Exception as exc:
        return [f"{name}: {key} does not decode: {type(exc).__name__}: {exc}"]
    problems = []
    if size != (row["width"], row["height"]):
        problems.append(
            f"{name}: {key} image is {size}, parquet says {(row['width'], row['height'])}"
        )
    for column in ("sha256", "url", "width", "height", "bytes"):
        if meta.get(column) != row[column]:
            problems.append(
                f"{name}: {key} json {column}={meta.get(column)!r} != parquet {row[column]!r}"
            )
    if row["jpg_sha256"] != hashlib.sha256(files["jpg"]).hexdigest():
        problems.append(f"{name}: {key} jpg bytes do not match their recorded hash")
    return problems


def render(action: str, report: dict) -> str:
    if action == "shards":
        lines = [f"{'shard':>5} {'rows':>7} {'ok':>7} {'failed':>7} {'tar MB':>8} {'s':>7}"]
        for r in report["shards"]:
            lines.append(
                f"{r['shard']:>5} {r['count']:>7} {r['successes']:>7} {r['failures']:>7} "
                f"{r['tar_bytes'] / 1e6:>8.1f} {r['duration_s']:>7.1f}"
            )
        for r in report.get("curated_shards", []):
            lines.append(f"curated/{r['shard']} {r['count']} samples "
                         f"{r['tar_bytes'] / 1e6:.1f} MB{'' if r['done'] else ' (unfinished)'}")  # fmt: skip
        return "\n".join(lines)
    if action == "failures":
        lines = []
        for f in report["failures"]:
            lines.append(f"{f['error_type']}: {f['count']}")
            lines += [f"    {e['url']}  ({e['error_message']})" for e in f["examples"]]
        return "\n".join(lines) or "no failures"
    if action == "validate":
        head = f"{'OK' if report['ok'] else 'MISMATCH'}: {report['shards_checked']} shards checked"
        if "curated_shards_checked" in report:
            head += f", {report['curated_shards_checked']} curated shards checked"
        return "\n".join([head] + report["problems"])
    if action == "clusters":
        lines = [f"{'level':<12} {'set':<8} {'clusters':>8} {'min':>6} {'median':>8} {'max':>6} "
                 f"{'entropy':>8}"]  # fmt: skip
        for level, sets in report["levels"].items():
            for name, b in sets.items():
                lines.append(f"{level:<12} {name:<8} {b.get('clusters', 0):>8} {b.get('min', 0):>6} "
                             f"{b.get('median', 0):>8} {b.get('max', 0):>6} "
                             f"{b.get('normalised_entropy', 0):>8}")  # fmt: skip
        return "\n".join(lines if report["levels"] else [report.get("note", "no clusters")])
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in report.items())
