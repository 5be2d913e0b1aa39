"""A picture of what curation did: ``python -m pipeline manifest gallery RUN [--out PAGE]``.

One static HTML page (``RUN/gallery/index.html`` by default) with every thumbnail embedded as a
data URI: no server, no network, safe to mail or attach to a report. It shows

- the counts of each stage and the cluster balance of the pool and of the curated set;
- for every k-means level, the largest and the smallest clusters, each as a strip of members
  (level 1: the closest to the centroid first);
- for a sample of seed images, the pool images retrieved around them, with cosine similarities;
- for a sample of semantic-duplicate groups (and eval-contaminated ones), the survivor and what
  was dropped, with each copy's similarity to the survivor.

Only the run directory's own files are read (crawl tars, parquet tables, summaries).
"""

from __future__ import annotations

import base64
import collections
import html
import io
import json
import logging
import random
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from pipeline import manifest
from pipeline.layout import RunLayout, shard_of_key
from pipeline.shardio import tar_member_index
from pretrain.configtools import atomic_write_text

log = logging.getLogger(__name__)

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:14px 0 4px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.strip{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img{display:block;border:1px solid #ccc;max-width:var(--t);max-height:var(--t)}
figure.keep img{border:3px solid #2a7}figure.drop img{border:3px solid #c33}
figure.seed img{border:3px solid #36c}.note{color:#777}
"""


class Thumbnails:
    """key -> data URI of a small JPEG, read from the run's crawl (or seed) tars on demand."""

    def __init__(self, layout: RunLayout, size: int) -> None:
        self.layout, self.size = layout, size
        self._indices: dict[Path, dict] = {}
        self._uris: dict[str, str | None] = {}
        self.failed = 0

    def _tar_of(self, key: str) -> Path:
        seeds = self.layout.seed_crawl_dir / "00000.tar"
        if seeds.exists() and key in self._index(seeds):
            return seeds
        return self.layout.crawl_shard(shard_of_key(key)).tar

    def _index(self, tar: Path) -> dict:
        if tar not in self._indices:
            self._indices[tar] = tar_member_index(tar) if tar.exists() else {}
        return self._indices[tar]

    def made(self) -> int:
        return sum(1 for uri in self._uris.values() if uri)

    def uri(self, key: str) -> str | None:
        if key not in self._uris:
            self._uris[key] = self._make(key)
        return self._uris[key]

    def _make(self, key: str) -> str | None:
        try:
            tar = self._tar_of(key)
            offset, size = self._index(tar)[key]["jpg"]
            with open(tar, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
                img.thumbnail((self.size, self.size))
                out = io.BytesIO()
                img.save(out, format="JPEG", quality=82)
        except Exception as exc:  # noqa: BLE001 - a picture that cannot be shown is counted
            self.failed += 1
            log.warning("gallery: no thumbnail for %s: %s", key, exc)
            return None
        return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _figure(thumbs: Thumbnails, key: str, caption: str, kind: str = "") -> str:
    uri = thumbs.uri(key)
    klass = f' class="{kind}"' if kind else ""
    title = html.escape(key, quote=True)
    if uri is None:
        body = f'<div class="note">({html.escape(key)}: unreadable)</div>'
    else:
        body = f'<img src="{uri}" alt="{title}" title="{title}">'
    return f"<figure{klass}>{body}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _pick(items: list[str], n: int) -> list[str]:
    """A fixed sample of up to ``n`` of ``items`` (sorted): the page is reproducible."""
    return sorted(random.Random(0).sample(items, min(n, len(items))))


def _strip(lead: str, rest: list[str]) -> str:
    return f'<div class="strip">{lead}{"".join(rest)}</div><br>'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _counts_section(run_dir: Path) -> str:
    report = manifest.summary(run_dir)
    labels = {"urls": "URLs crawled", "fetched": "images fetched",
              "exact_duplicates": "exact duplicates (sha256)",
              "near_duplicates": "near duplicates (pHash)",
              "eval_contaminated": "removed by eval decontamination"}  # fmt: skip
    rows = [[labels.get(k, k.replace("_", " ")), "-" if v is None else v]
            for k, v in manifest.stage_counts(report).items()]  # fmt: skip
    backbone = (report.get("embed") or {}).get("backbone") or {}
    text = "<h2>Counts</h2>" + _table(["stage", "count"], rows)
    if backbone:
        text += (
            f'<p class="note">embedded by {html.escape(str(backbone.get("source")))} '
            f"(sha256 {html.escape(str(backbone.get('sha256', ''))[:16])}…)</p>"
        )
    levels = manifest.clusters(run_dir).get("levels", {})
    if levels:
        brows = []
        for column, views in levels.items():
            for view in ("pool", "curated"):
                b = views.get(view)
                if b and b.get("clusters"):
                    brows.append([f"{column} {view}", b["clusters"], b["min"], b["median"],
                                  b["max"], b["normalised_entropy"]])  # fmt: skip
        text += "<h3>Cluster balance</h3>" + _table(
            ["level", "clusters", "min", "median", "max", "normalised entropy"], brows
        )
    return text


def _clusters_section(layout: RunLayout, thumbs: Thumbnails, strip: int, extremes: int) -> str:
    if not layout.assignments.exists():
        return "<h2>Clusters</h2><p class='note'>no clusters yet: run the cluster stage</p>"
    table = pq.read_table(layout.assignments).to_pydict()
    curated: dict[str, collections.Counter] = {}
    if layout.curated_manifest.exists():
        cm = pq.read_table(layout.curated_manifest).to_pydict()
        curated = {c: collections.Counter(cm[c]) for c in cm if c.startswith("cluster_l")}
    parts = ["<h2>Clusters: the largest and the smallest of each level</h2>"]
    columns = sorted(c for c in table if c.startswith("cluster_l"))
    for column in columns:
        members: dict[int, list[int]] = collections.defaultdict(list)
        for row, label in enumerate(table[column]):
            members[label].append(row)
        by_size = sorted(members, key=lambda c: (-len(members[c]), c))
        shown = by_size[:extremes] + [c for c in by_size[-extremes:] if c not in by_size[:extremes]]
        parts.append(f"<h3>{html.escape(column)}: {len(members)} clusters</h3>")
        for c in shown:
            rows = sorted(members[c], key=lambda r: (table["distance"][r], table["key"][r]))
            if column != "cluster_l1":  # no distance to a higher-level centroid: a fixed sample
                rows = sorted(random.Random(c).sample(members[c], min(strip, len(members[c]))))
            figs = "".join(_figure(thumbs, table["key"][r], table["key"][r]) for r in rows[:strip])
            n_cur = curated.get(column, {}).get(c, 0)
            parts.append(
                f"<p>cluster {html.escape(str(c))}: {len(members[c])} pool images, {n_cur} curated</p>"
                f'<div class="strip">{figs}</div>'
            )
    return "".join(parts)


def _retrieval_section(layout: RunLayout, thumbs: Thumbnails, n_seeds: int, strip: int) -> str:
    head = "<h2>Retrieval: seed images and the pool images found around them</h2>"
    if not layout.selection.exists():
        return head + "<p class='note'>no selection yet: run the curate stage</p>"
    sel = pq.read_table(layout.selection).to_pylist()
    around: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for r in sel:
        if r["selected_by"] == "retrieval" and r["query_key"] is not None:
            around[r["query_key"]].append((1.0 - r["query_distance"], r["key"]))
    if not around:
        kinds = collections.Counter(r["selected_by"] for r in sel)
        return head + f"<p class='note'>no per-seed retrieval in this run (selected by: " \
                      f"{html.escape(json.dumps(dict(kinds)))})</p>"  # fmt: skip
    seeds = sorted(around)
    picked = _pick(seeds, n_seeds)
    parts = [head, f"<p>{len(seeds)} seed images retrieved {sum(map(len, around.values()))} "
                   f"pool images; {len(picked)} shown</p>"]  # fmt: skip
    for seed in picked:
        hits = sorted(around[seed], reverse=True)[:strip]
        parts.append(_strip(_figure(thumbs, seed, "seed", "seed"),
                            [_figure(thumbs, key, f"cos {sim:.3f}") for sim, key in hits]))  # fmt: skip
    return "".join(parts)


def _dedup_section(layout: RunLayout, thumbs: Thumbnails, n_groups: int, strip: int) -> str:
    head = "<h2>Semantic duplicates: the survivor (green) and what was dropped (red)</h2>"
    if not layout.semantic_parquet.exists():
        return head + "<p class='note'>no semantic dedup yet</p>"
    rows = pq.read_table(layout.semantic_parquet).to_pylist()
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    eval_hits = []
    for r in rows:
        if r["reason"] == "semantic":
            groups[r["duplicate_of"]].append(r)
        elif r["reason"] == "eval":
            eval_hits.append(r)
    parts = [head, f"<p>{len(groups)} groups with copies, "
                   f"{sum(map(len, groups.values()))} copies dropped</p>"]  # fmt: skip
    picked = _pick(sorted(groups), n_groups)
    for survivor in picked:
        dropped = sorted(groups[survivor], key=lambda r: -(r["similarity"] or 0))[: strip - 1]
        parts.append(_strip(_figure(thumbs, survivor, "kept", "keep"),
                            [_figure(thumbs, r["key"], f"cos {r['similarity']:.3f}", "drop")
                             for r in dropped]))  # fmt: skip
    if eval_hits:
        parts.append(f"<h3>Removed by eval decontamination: {len(eval_hits)} images</h3>")
        figs = "".join(_figure(thumbs, r["key"], "eval", "drop") for r in eval_hits[:strip])
        parts.append(f'<div class="strip">{figs}</div>')
    return "".join(parts)


def gallery(run_dir: Path, out: Path | None = None, thumb: int = 112, strip: int = 8,
            extremes: int = 3, n_seeds: int = 6, n_groups: int = 6) -> dict:  # fmt: skip
    """Write the page; return {"page": path, "thumbnails": images on it, "distinct": images,
    "unreadable": samples whose picture could not be shown}."""
    layout = RunLayout(run_dir)
    out = Path(out) if out else layout.root / "gallery" / "index.html"
    thumbs = Thumbnails(layout, thumb)
    body = "".join([
        _counts_section(layout.root),
        _clusters_section(layout, thumbs, strip, extremes),
        _retrieval_section(layout, thumbs, n_seeds, strip),
        _dedup_section(layout, thumbs, n_groups, strip),
    ])  # fmt: skip
    title = f"dinoforge curation: {layout.root.resolve().name}"
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>:root{{--t:{thumb}px}}{STYLE}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        f'<p class="note">{html.escape(str(layout.root.resolve()))}</p>{body}</body></html>\n'
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return {"page": str(out), "thumbnails": page.count("<img "), "distinct": thumbs.made(),
            "unreadable": thumbs.failed}  # fmt: skip
