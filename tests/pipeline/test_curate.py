"""configs/pipeline/curate.yaml end to end through the CLI on the shared Ray cluster: crawl,
exact/pHash dedup, embed (Ray actors, the fixture ViT), semantic dedup and decontamination,
hierarchical k-means, retrieval around seed images + balanced sampling, curated shards;
verdicts checked against a brute-force reference on the stored embeddings; curated shards
against their manifest and read by the training loader; resume, settings changes and SIGKILL
during the embed stage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import plan
from pipeline.layout import RunLayout
from pipeline.simweb import ImageServer, build_web, semantic_copy

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/pipeline/curate.yaml")
FIXTURE = REPO / "tests/fixtures/vit_test_embedder.safetensors"
THRESHOLD = 0.95
TARGET = 14
STAGES = ["crawl", "dedup", "embed", "semdedup", "cluster", "curate", "write"]


@pytest.fixture(scope="module")
def curation_web():
    """48 distinct images, 2 exact, 2 near and 3 x 2 semantic copies, 2 broken URLs."""
    return build_web(48, seed=5, n_exact=2, n_near=2, n_semantic=3, n_broken=2)


@pytest.fixture(scope="module")
def curation_server(curation_web):
    with ImageServer(curation_web) as server:
        yield server


def _cli(*args: str, address: str | None = None, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=address or "")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=280, **popen)  # fmt: skip


def _args(urls: Path, out: Path, *extra: str) -> list[str]:
    return ["run", CONFIG, f"input.urls={urls}", f"output_dir={out}", "crawl.shard_size=16",
            "crawl.allow_private_networks=true", "crawl.threads_per_task=8",
            f"embed.checkpoint={FIXTURE}", "embed.image_size=56", "embed.batch_size=8",
            f"semdedup.threshold={THRESHOLD}", "semdedup.query_chunk=16",
            "cluster.levels=[6,2]", "cluster.resampling_steps=[1,2]", "cluster.sample_sizes=[0,0]",
            "curate.retrieval=sample", "curate.per_seed=2", f"curate.target_size={TARGET}",
            "curate.shard_size=5", "curate.include_seeds=true", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def eval_dir(curation_web, tmp_path_factory):
    """Two evaluation images: edited copies of two pool originals that no planted group uses."""
    import random

    out = tmp_path_factory.mktemp("evalset")
    originals = sorted(p for p in curation_web.images if "-" not in Path(p).name)
    rng = random.Random(3)
    for i, path in enumerate((originals[1], originals[7])):
        (out / f"eval{i}.jpg").write_bytes(semantic_copy(curation_web.images[path], 1, rng))
    return out


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory):
    """Four seed images "of the domain I want more of" (other crops of the same photographs),
    given as a URL list: the curate stage crawls them like the pool, then embeds them."""
    out = tmp_path_factory.mktemp("seeds")
    web = build_web(4, seed=77)
    with ImageServer(web) as server:
        (out / "seeds.txt").write_text("".join(server.url(p) + "\n" for p in sorted(web.images)))
        yield out / "seeds.txt"


@pytest.fixture(scope="module")
def curated_run(curation_web, curation_server, eval_dir, seeds_dir, ray_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curate")
    from pipeline.simweb import SimWeb  # noqa: F401  (the web's paths name the URLs)

    paths = curation_web.paths()
    urls = tmp / "urls.parquet"
    pq.write_table(pa.table({"url": [curation_server.url(p) for p in paths], "path": paths}), urls)
    out = tmp / "run"
    result = _cli(*_args(urls, out, f"decontaminate.sets=[{eval_dir}]",
                         f"curate.seeds={seeds_dir}"), address=ray_address)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return urls, out, json.loads(result.stdout)


def _embeddings(layout: RunLayout) -> tuple[np.ndarray, list[str]]:
    feats, keys = [], []
    for part in layout.embed_done():
        feats.append(np.load(part.npy).astype(np.float32))
        keys += pq.read_table(part.keys)["key"].to_pylist()
    return np.concatenate(feats), keys


def _reference_verdicts(feats, keys, areas, threshold, eval_feats, eval_threshold) -> dict:
    """Brute force: all pairs above the threshold, union-find, survivor = largest area then
    smallest key; components touching an eval image dropped whole."""
    n = len(keys)
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    sims = feats @ feats.T
    for i, j in zip(*np.nonzero(np.triu(sims > threshold, 1))):
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    touched = set(np.nonzero((feats @ eval_feats.T > eval_threshold).any(axis=1))[0])
    verdict = {}
    for members in groups.values():
        survivor = min(members, key=lambda i: (-areas[keys[i]], keys[i]))
        for i in members:
            if any(m in touched for m in members):
                verdict[keys[i]] = "eval"
            else:
                verdict[keys[i]] = None if i == survivor else "semantic"
    return verdict


def test_curate_end_to_end(curated_run, curation_web, eval_dir):
    urls, out, summary = curated_run
    layout = RunLayout(out)
    assert summary["stages"] == STAGES and summary["ok"]
    for stage in summary["stages"]:
        assert json.loads(layout.stage_file(stage).read_text())["state"] == "done"
    crawl = pq.read_table([s.parquet for s in layout.crawl_done()]).to_pylist()
    successes = {r["key"]: r for r in crawl if r["status"] == "success"}
    assert len(successes) == len(curation_web.images)
    dedup = {r["key"]: r for r in pq.read_table(layout.dedup_parquet).to_pylist()}
    survivors = {k for k, r in dedup.items() if r["duplicate_of"] is None}
    path_of = {k: r["url"].split("/", 3)[3] for k, r in successes.items()}
    planted = {**curation_web.exact_duplicates, **curation_web.near_duplicates}
    pixel_dropped = {path_of[k] for k in set(successes) - survivors}
    # pHash drops every exact and near copy, and nothing but planted copies (it may catch some
    # of the semantic copies too: the rescaled ones)
    assert set(planted) <= pixel_dropped <= set(planted) | set(curation_web.semantic_duplicates)

    feats, keys = _embeddings(layout)
    assert sorted(keys) == sorted(survivors)  # duplicates are not embedded twice
    semantic = pq.read_table(layout.semantic_parquet).to_pylist()
    assert sorted(r["key"] for r in semantic) == sorted(survivors)  # one verdict per sample
    eval_feats = np.load(layout.embed_done(eval_set=True)[0].npy).astype(np.float32)
    areas = {k: r["original_width"] * r["original_height"] for k, r in successes.items()}
    expected = _reference_verdicts(feats, keys, areas, THRESHOLD, eval_feats, 0.45)
    assert {r["key"]: r["reason"] for r in semantic} == expected

    report = json.loads(_cli("manifest", "summary", str(out), "--json").stdout)
    assert report["stages"] == dict.fromkeys(summary["stages"], "done")
    assert report["embed"]["images"] == len(survivors) and report["embed"]["dim"] == 64
    import hashlib

    assert report["embed"]["backbone"]["sha256"] == hashlib.sha256(FIXTURE.read_bytes()).hexdigest()
    reasons = [r["reason"] for r in semantic]
    assert report["semdedup"]["semantic_duplicates"] == reasons.count("semantic")
    assert report["semdedup"]["eval_contaminated"] == reasons.count("eval")


COPY_FIXTURE = REPO / "tests/fixtures/vit_test_copy_embedder.safetensors"
COPY_THRESHOLD = 0.78


def test_planted_copies_collapse_and_distinct_images_stay(ray_address, tmp_path):
    """Semantic dedup with a real embedder, as a user runs it (crawl over HTTP, embed on Ray):
    300 generated scenes that share no content and two edited copies of 30 of them (cropped by
    2-8% per side and colour-shifted; rescaled to 60% and re-encoded at quality 60). The
    embedder is the copy-detection fixture: vit_test trained by instance discrimination on
    scenes of another seed (tests/fixtures/make_copy_embedder.py, docs/benchmarks.md). Every
    planted group must become one component whose survivor is the original (the largest), and
    no two distinct scenes may merge."""
    web = build_web(300, seed=5, n_semantic=30, scenes=True)
    with ImageServer(web) as server:
        paths = sorted(web.images)
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [server.url(p) for p in paths]}), urls)
        out = tmp_path / "run"
        result = _cli("run", CONFIG, f"input.urls={urls}", f"output_dir={out}",
                      "stages=[crawl,dedup,embed,semdedup]", "crawl.shard_size=120",
                      "crawl.allow_private_networks=true", f"embed.checkpoint={COPY_FIXTURE}",
                      "embed.image_size=56", f"semdedup.threshold={COPY_THRESHOLD}",
                      "dedup.phash_threshold=0",
                      address=ray_address)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    layout = RunLayout(out)
    crawl = pq.read_table([s.parquet for s in layout.crawl_done()]).to_pylist()
    path_of = {r["key"]: r["url"].split("/", 3)[3] for r in crawl if r["status"] == "success"}
    assert sorted(path_of.values()) == paths
    pixel = {path_of[r["key"]]: path_of[r["duplicate_of"]]
             for r in pq.read_table(layout.dedup_parquet).to_pylist() if r["duplicate_of"]}  # fmt: skip
    semantic = pq.read_table(layout.semantic_parquet).to_pylist()
    verdict = {path_of[r["key"]]: r for r in semantic}
    assert sorted([*verdict, *pixel]) == paths  # one verdict per image
    copies = web.semantic_duplicates
    # pHash at distance 0 takes only copies whose hash did not change (most rescaled ones): the
    # cropped, colour-shifted ones are left to the embeddings
    assert set(pixel.items()) <= set(copies.items())
    assert sum(r["reason"] == "semantic" for r in semantic) == len(copies) - len(pixel) >= 30
    for copy, original in copies.items():
        if copy in pixel:
            continue
        assert verdict[copy]["reason"] == "semantic", copy
        assert path_of[verdict[copy]["duplicate_of"]] == original, copy
        assert verdict[copy]["component"] == verdict[original]["component"]
        assert verdict[original]["reason"] is None
    distinct = [p for p in paths if p not in copies]
    assert all(verdict[p]["reason"] is None for p in distinct)
    assert len({verdict[p]["component"] for p in distinct}) == len(distinct)


def test_curated_shards(curated_run, seeds_dir, tmp_path):
    """Retrieval (exact against brute force), balanced sampling to the exact target, curated
    shards that validate against the manifest, read by the training job."""
    urls, out, summary = curated_run
    layout = RunLayout(out)
    semantic = pq.read_table(layout.semantic_parquet).to_pylist()
    kept = {r["key"] for r in semantic if r["reason"] is None}
    feats, keys = _embeddings(layout)
    pool = [i for i, k in enumerate(keys) if k in kept]
    seeds = np.load(layout.embed_done(seeds=True)[0].npy).astype(np.float32)
    expected = set()
    for s in seeds:  # brute force: the 2 nearest kept pool images of every seed
        sims = feats[pool] @ s
        expected |= {keys[pool[i]] for i in np.argsort(-sims, kind="stable")[:2]}
    # Level 1 assigned in Ray tasks: each kept image's nearest centroid; level 2 composes.
    assignments = pq.read_table(layout.assignments).to_pydict()
    assert sorted(assignments["key"]) == sorted(kept)
    centroids = np.load(layout.level_dir(1) / "centroids.npy")
    mine = feats[[keys.index(k) for k in assignments["key"]]]
    np.testing.assert_array_equal(assignments["cluster_l1"], np.argmax(mine @ centroids.T, axis=1))
    level2 = np.load(layout.level_dir(2) / "assignment.npy")
    np.testing.assert_array_equal(assignments["cluster_l2"], level2[assignments["cluster_l1"]])
    selection = pq.read_table(layout.selection).to_pylist()
    retrieved = {r["key"] for r in selection if r["selected_by"] == "retrieval"}
    assert retrieved == expected
    curate = summary["curate"]
    assert curate["retrieval"]["retrieved"] == len(expected)
    assert curate["retrieval"]["collisions"] == 2 * len(seeds) - len(expected)
    from_pool = [r for r in selection if r["selected_by"] != "seed"]
    assert sum(r["multiplicity"] for r in from_pool) == TARGET
    assert {r["key"] for r in from_pool} <= kept  # nothing dropped by dedup is curated
    assert len({r["key"] for r in selection}) == len(selection)
    # curate.include_seeds: the 4 seed images, crawled like the pool, join on top of the target
    seed_rows = [r for r in selection if r["selected_by"] == "seed"]
    assert len(seed_rows) == len(seeds) == 4 and curate["seeds_included"] == 4

    manifest = pq.read_table(layout.curated_manifest).to_pylist()
    assert len(manifest) == TARGET + 4 and summary["write"]["shards"] == 4  # 5 + 5 + 5 + 3
    assert sum(r["selected_by"] == "seed" for r in manifest) == 4
    assert {"cluster_l1", "cluster_l2", "distance", "selected_by", "query_key", "query_distance",
            "multiplicity", "shard", "url", "sha256", "jpg_sha256"} <= set(manifest[0])  # fmt: skip
    for row in manifest:
        if row["selected_by"] == "retrieval":
            assert row["query_key"] is not None and 0 <= row["query_distance"] <= 2
    check = _cli("manifest", "validate", str(out), "--json")
    report = json.loads(check.stdout)
    assert check.returncode == 0 and report["ok"] and report["curated_samples"] == TARGET + 4
    listed = json.loads(_cli("manifest", "shards", str(out), "--json").stdout)["curated_shards"]
    assert [r["count"] for r in listed] == [5, 5, 5, 3] and all(r["done"] for r in listed)
    clusters = json.loads(_cli("manifest", "clusters", str(out), "--json").stdout)["levels"]
    assert clusters["cluster_l1"]["curated"]["clusters"] >= 1
    curated = json.loads(layout.curated_summary.read_text())
    assert curated["curated_samples"] == TARGET + 4 and len(curated["shards"]) == 4

    from pretrain.data.loader import resolve_shards

    assert resolve_shards(str(out)) == [str(out / s) for s in curated["shards"]]
    train = tmp_path / "train"
    run = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "--config",
         str(REPO / "configs/pretrain/vit_test_cpu.yaml"), f"data.shards={out}",
         f"output_dir={train}", "train.steps=2", "train.log_every=1"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert len((train / "metrics.jsonl").read_text().splitlines()) == 2


def test_fork_then_a_random_control_of_the_same_size(curated_run, eval_dir, ray_address, tmp_path):
    """`pipeline fork` reuses the finished stages by hard link; curate.mode=random in the fork
    draws TARGET distinct kept images uniformly, and the source run is left as it was."""
    urls, out, _ = curated_run
    layout, fork = RunLayout(out), RunLayout(tmp_path / "random")
    selection_before = layout.selection.read_bytes()
    forked = _cli("fork", str(out), str(fork.root), "--through", "cluster")
    assert forked.returncode == 0, forked.stderr[-3000:]
    for shard in layout.crawl_done():
        assert os.stat(shard.tar).st_ino == os.stat(fork.crawl_shard(shard.index).tar).st_ino
    assert sorted(p.name for p in fork.stages_dir.iterdir()) == [
        f"{s}.json" for s in sorted(["crawl", "dedup", "embed", "semdedup", "cluster"])
    ]
    assert not fork.seed_embed_dir.exists() and not fork.curated_dir.exists()
    assert fork.train_shard_list.read_text().split() == [
        f"crawl/{s.tar.name}" for s in layout.crawl_done()
    ]
    assert _cli("fork", str(out), str(fork.root)).returncode == 2  # not empty
    assert _cli("fork", str(out), str(fork.root), "--exist-ok").returncode == 0
    assert _cli("fork", str(out), str(tmp_path / "x"), "--through", "nope").returncode == 2

    run = _cli(*_args(urls, fork.root, "stages=[curate,write]", "curate.mode=random",
                      "curate.include_seeds=false", f"decontaminate.sets=[{eval_dir}]"),
               address=ray_address)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    selection = pq.read_table(fork.selection).to_pylist()
    kept = {r["key"] for r in pq.read_table(layout.semantic_parquet).to_pylist()
            if r["reason"] is None}  # fmt: skip
    assert len(selection) == TARGET and {r["selected_by"] for r in selection} == {"random"}
    assert len({r["key"] for r in selection}) == TARGET and {r["key"] for r in selection} <= kept
    from pipeline.stages.curate import uniform_sample

    pool_keys = pq.read_table(fork.assignments)["key"].to_pylist()
    rows = uniform_sample(len(pool_keys), TARGET, 0)
    assert sorted(r["key"] for r in selection) == sorted(pool_keys[i] for i in rows)
    check = json.loads(_cli("manifest", "validate", str(fork.root), "--json").stdout)
    assert check["ok"] and check["curated_samples"] == TARGET
    assert layout.selection.read_bytes() == selection_before
    assert all(os.stat(shard.tar).st_nlink == 2 for shard in layout.crawl_done())


@pytest.fixture(scope="module")
def gallery(curated_run, tmp_path_factory):
    page = tmp_path_factory.mktemp("gallery") / "index.html"
    made = _cli("manifest", "gallery", str(curated_run[1]), "--out", str(page), "--json")
    assert made.returncode == 0, made.stderr[-3000:]
    return page, json.loads(made.stdout)


def test_gallery_page(curated_run, gallery):
    """The gallery: one self-contained page; every thumbnail a decodable JPEG data URI; the
    seeds' retrieved neighbours and the semantic-duplicate groups are the run's own."""
    import base64
    import io
    import re

    from PIL import Image

    urls, out, _ = curated_run
    page, report = gallery
    text = page.read_text()
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert len(sources) == report["thumbnails"] > 10 and report["unreadable"] == 0
    assert len(set(sources)) == report["distinct"]
    assert "http" not in "".join(sources) and "<script" not in text  # nothing to fetch
    for uri in set(sources):
        assert uri.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
            img.load()
            assert max(img.size) <= 112
    layout = RunLayout(out)
    selection = pq.read_table(layout.selection).to_pylist()
    seeds = {r["query_key"] for r in selection if r["selected_by"] == "retrieval"}
    assert text.count("figcaption>seed<") == min(6, len(seeds))
    semantic = pq.read_table(layout.semantic_parquet).to_pylist()
    groups = {r["duplicate_of"] for r in semantic if r["reason"] == "semantic"}
    assert f"{len(groups)} groups with copies" in text
    assert text.count("figcaption>kept<") == min(6, len(groups))
    levels = [
        c for c in pq.read_table(layout.assignments).column_names if c.startswith("cluster_l")
    ]
    for column in levels:
        assert f"{column}: " in text


def test_gallery_in_chromium(gallery):
    """In Debian's Chromium (headless, through Playwright) when both are installed (`make
    test-browser` installs them): every thumbnail decodes (naturalWidth > 0), no console
    error, and a screenshot beside the page. Skipped, saying so, where they are not."""
    page, report = gallery
    screenshot = page.with_suffix(".png")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if not chromium:
        pytest.skip("no Chromium + Playwright here: `make test-browser` installs them")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])  # fmt: skip
        tab = browser.new_page()
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(page.resolve().as_uri(), wait_until="load")
        widths = tab.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
        tab.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert len(widths) == report["thumbnails"] and all(w > 0 for w in widths), widths
    assert not errors, errors
    assert screenshot.stat().st_size > 10_000


def _as_overrides(settings: dict) -> list[str]:
    """A stage state's recorded settings as command-line overrides."""

    def text(value) -> str:
        if isinstance(value, list):
            return "[" + ",".join(text(v) for v in value) + "]"
        if isinstance(value, bool) or value is None:
            return {True: "true", False: "false", None: "null"}[value]
        return str(value)

    out = []
    for key, value in settings.items():
        for sub, v in value.items() if isinstance(value, dict) else [(None, value)]:
            out.append(f"{key}.{sub}={text(v)}" if sub else f"{key}={text(v)}")
    return out


def test_curate_refuses_the_clusters_of_another_pool(curated_run, seeds_dir, ray_address,
                                                     tmp_path):  # fmt: skip
    """The crawl's failures fetched again and the stages up to semantic dedup rerun (a new
    pool), then curate alone: the clusters index the old pool's rows, so curate refuses them."""
    urls, out, _ = curated_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    # before test_rerun_skips_... (it redoes semdedup on `out` to a pool too small to cluster);
    # the settings semdedup last ran with, as recorded in the run
    ran = (plan.read_state(RunLayout(run), "semdedup") or {})["settings"]
    same = (*_as_overrides(ran), f"curate.seeds={seeds_dir}")
    current = _cli(*_args(urls, run, *same, "stages=[cluster,curate]"), address=ray_address)
    assert current.returncode == 0, current.stderr[-3000:]  # clusters of the pool as it is
    pool = _cli(*_args(urls, run, *same, "crawl.retry_failed=true",
                       "stages=[crawl,dedup,embed,semdedup]"), address=ray_address)  # fmt: skip
    assert pool.returncode == 0, pool.stderr[-3000:]
    assert not json.loads(pool.stdout)["semdedup"].get("skipped")
    stale = _cli(*_args(urls, run, *same, "stages=[curate]"), address=ray_address)
    assert stale.returncode == 2
    assert "computed from another pool" in stale.stderr and "add cluster" in stale.stderr
    fresh = _cli(*_args(urls, run, *same, "stages=[cluster,curate]"), address=ray_address)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert not json.loads(fresh.stdout)["cluster"].get("skipped")


def test_an_edited_seed_set_is_crawled_again(curated_run, seeds_dir, ray_address, tmp_path):
    """curate.seeds edited in place (a seed taken out of the list): the next curate crawls and
    embeds the seed set again rather than retrieving around the old seeds."""
    urls, out, _ = curated_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    layout = RunLayout(run)
    ran = (plan.read_state(layout, "semdedup") or {})["settings"]  # as the test above
    edited = tmp_path / "seeds.txt"  # the run's own seed list (a stage setting: redo=[curate])
    edited.write_text(seeds_dir.read_text())
    same = (*_as_overrides(ran), f"curate.seeds={edited}")
    first = _cli(*_args(urls, run, *same, "stages=[curate]", "redo=[curate]"),
                 address=ray_address)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    seeds = layout.embed_done(seeds=True)[0]
    assert json.loads(seeds.done.read_text())["count"] == 4
    edited.write_text(seeds_dir.read_text().splitlines(keepends=True)[1])  # in place: one seed
    second = _cli(*_args(urls, run, *same, "stages=[curate]"), address=ray_address)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(seeds.done.read_text())["count"] == 1
    curate = json.loads(second.stdout)["curate"]
    assert not curate.get("skipped") and curate["seeds_included"] == 1
    selection = pq.read_table(layout.selection).to_pylist()
    assert sum(r["selected_by"] == "seed" for r in selection) == 1
    edited.unlink()  # gone: refused before Ray, like any missing input
    third = _cli(*_args(urls, run, *same, "stages=[curate]"), address=ray_address)
    assert third.returncode == 2 and "curate.seeds" in third.stderr, third.stderr[-3000:]


def test_rerun_skips_and_changed_settings_are_refused(curated_run, eval_dir, seeds_dir,
                                                      ray_address):  # fmt: skip
    urls, out, _ = curated_run
    layout = RunLayout(out)
    before = {p.name: p.read_bytes() for p in sorted(layout.embed_dir.glob("*.npy"))}
    again = _cli(*_args(urls, out, f"decontaminate.sets=[{eval_dir}]",
                        f"curate.seeds={seeds_dir}"), address=ray_address)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["crawl"]["crawled_shards"] == 0 and summary["dedup"]["skipped"]
    assert summary["embed"]["embedded_shards"] == 0 and summary["semdedup"]["skipped"]
    assert all(summary[s]["skipped"] for s in ("cluster", "curate", "write"))
    assert {p.name: p.read_bytes() for p in sorted(layout.embed_dir.glob("*.npy"))} == before

    changed = _cli(*_args(urls, out, "semdedup.threshold=0.5", "stages=[semdedup]"),
                   address=ray_address)  # fmt: skip
    assert changed.returncode == 2
    assert "semdedup.threshold=0.95" in changed.stderr and "redo=[semdedup]" in changed.stderr
    # Redo with an IVF index (every list probed: exact), query chunks on Ray tasks.
    sub = _cli(*_args(urls, out, "semdedup.threshold=0.5", "redo=[semdedup]", "stages=[semdedup]",
                      "semdedup.index=ivf", "semdedup.ivf_nlist=1", "semdedup.ivf_nprobe=1"),
               address=ray_address)  # fmt: skip
    assert sub.returncode == 0, sub.stderr[-3000:]
    assert json.loads(sub.stdout)["stages"] == ["semdedup"]
    semantic = pq.read_table(layout.semantic_parquet).to_pylist()
    feats, keys = _embeddings(layout)
    crawl = pq.read_table([s.parquet for s in layout.crawl_done()]).to_pylist()
    areas = {r["key"]: (r["original_width"] or 0) * (r["original_height"] or 0) for r in crawl}
    no_eval = np.zeros((0, feats.shape[1]), np.float32)
    expected = _reference_verdicts(feats, keys, areas, 0.5, no_eval, 0.45)
    assert {r["key"]: r["reason"] for r in semantic} == expected
    assert list(expected.values()).count("semantic") > 0


def test_sigkill_during_embed_then_rerun(curated_run, ray_address, tmp_path, wait):
    """A driver killed mid-stage leaves finished shards only; the rerun gives the very files of
    an uninterrupted run, no row twice."""
    urls, reference, _ = curated_run
    out = tmp_path / "killed"
    # The same crawl (a crawl's tars hold samples in completion order, so a second crawl of
    # the same URLs may order them otherwise); redo=[embed] clears embed and what follows.
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("embed"))
    layout = RunLayout(out)
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=ray_address)
    # batch 1 and one decode thread: the shards take long enough to kill between them
    cmd = [sys.executable, "-m", "pipeline", *_args(urls, out, "stages=[embed]", "redo=[embed]",
           "embed.batch_size=1", "embed.decode_threads=1")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    assert wait(lambda: len(layout.embed_done()) >= 1, timeout_s=120, every_s=0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(layout.embed_done())
    assert done_before < 4, "the kill came too late to test anything"
    rerun = _cli(*_args(urls, out, "stages=[embed]"), address=ray_address)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["embed"]["skipped_shards"] >= done_before
    ref = RunLayout(reference)
    assert [p.name for p in layout.embed_done()] == [p.name for p in ref.embed_done()]
    for mine, theirs in zip(layout.embed_done(), ref.embed_done()):
        np.testing.assert_array_equal(np.load(mine.npy), np.load(theirs.npy))
        assert pq.read_table(mine.keys).equals(pq.read_table(theirs.keys))
    assert not list(layout.embed_dir.glob(".*.tmp"))


def test_bad_curation_input_is_refused_before_ray(tmp_path, eval_dir):
    """Empty seed folder, missing eval set, bad thresholds and cluster levels: exit 2, the key
    named, before any work."""
    from pipeline.cli import prepare_run
    from pretrain.configtools import ConfigError

    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [f"input.urls={urls}", f"output_dir={tmp_path / 'run'}", f"embed.checkpoint={FIXTURE}",
            "curate.target_size=5"]  # fmt: skip
    cases = {
        "curate.seeds": [f"curate.seeds={empty}"],
        "decontaminate.sets": [f"decontaminate.sets=[{tmp_path / 'nope'}]"],
        "semdedup.threshold": ["semdedup.threshold=1.5"],
        "decontaminate.threshold": ["decontaminate.threshold=0"],
        "cluster.levels": ["cluster.levels=[10,20]"],
        "curate.strategy": ["curate.strategy=nearest"],
        "curate.target_size": ["curate.mode=balanced", "curate.target_size=0"],
        "curate.seeds: input.urls file": [f"curate.seeds={tmp_path / 'missing.txt'}"],
        "embed.checkpoint": [f"embed.checkpoint={tmp_path / 'missing.pth'}"],
    }
    for key, extra in cases.items():
        with pytest.raises(ConfigError, match=key.split(":")[0].replace(".", r"\.")):
            prepare_run(CONFIG, [*base, *extra])
    result = _cli("run", CONFIG, *base, f"curate.seeds={empty}")
    assert result.returncode == 2 and "curate.seeds" in result.stderr and "Ray" not in result.stderr
