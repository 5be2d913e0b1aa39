"""Input formats, carried columns, local sources, and bad input rejected before any work."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import prepare_run
from pipeline.config import CrawlConfig, InputConfig
from pipeline.sources import InputError, check_input, iter_shards
from pipeline.stages.crawl import crawl_shard
from pretrain.configtools import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/pipeline/crawl.yaml")
URLS = [f"http://example.com/{i}.jpg" for i in range(25)]


def _write(path: Path, fmt: str) -> Path:
    if fmt == "parquet":
        pq.write_table(pa.table({"link": URLS, "caption": [f"c{i}" for i in range(25)]}), path)
    elif fmt == "csv":
        path.write_text("link,caption\n" + "".join(f"{u},c{i}\n" for i, u in enumerate(URLS)))
    elif fmt == "jsonl":
        path.write_text(
            "".join(json.dumps({"link": u, "caption": f"c{i}"}) + "\n" for i, u in enumerate(URLS))
        )
    else:
        path.write_text("\n".join(URLS) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "txt"])
def test_formats_shard_and_carry_columns(fmt, tmp_path):
    path = _write(tmp_path / f"urls.{fmt}", fmt)
    cfg = InputConfig(urls=str(path), url_column="url" if fmt == "txt" else "link")
    assert check_input(cfg) == 25
    shards = list(iter_shards(cfg, 10))
    assert [i for i, _ in shards] == [0, 1, 2]
    assert [t.num_rows for _, t in shards] == [10, 10, 5]
    merged = pa.concat_tables([t for _, t in shards])
    assert merged["url"].to_pylist() == URLS
    if fmt != "txt":
        assert merged["caption"].to_pylist() == [f"c{i}" for i in range(25)]


def test_columns_named_as_pipeline_fields_are_carried_renamed(image_server, crawl_cfg, tmp_path):
    """Every field the pipeline writes (the crawl manifest's, the curation's, cluster levels)
    is taken from the schemas: an input column of that name is carried as input_<name>."""
    from pipeline.layout import CRAWL_SCHEMA, CURATION_FIELDS

    reserved = [n for n in CRAWL_SCHEMA.names if n != "url"] + list(CURATION_FIELDS)
    reserved += ["cluster_l1", "cluster_l12"]
    assert "jpg_sha256" in reserved
    free = ["caption", "cluster", "cluster_lx", "shard_id"]
    path = tmp_path / "urls.parquet"
    url = image_server.url("img/000000.jpg")
    pq.write_table(pa.table({"url": [url], **{n: [f"v-{n}"] for n in reserved + free}}), path)
    ((_, table),) = iter_shards(InputConfig(urls=str(path)), 10)
    assert table.column_names == ["url", *(f"input_{n}" for n in reserved), *free]

    crawl_shard(table, 0, tmp_path / "crawl", crawl_cfg)
    row = pq.read_table(tmp_path / "crawl" / "00000.parquet").to_pylist()[0]
    assert row["status"] == "success" and len(row["jpg_sha256"]) == 64  # not the input's value
    assert all(row[f"input_{n}"] == f"v-{n}" for n in reserved)
    assert all(row[n] == f"v-{n}" for n in free)


@pytest.mark.parametrize(
    "content, overrides, message",
    [
        (None, [], "not found"),
        ("", [], "holds no rows"),
        ("link,caption\n", ["input.url_column=link"], "holds no rows"),
        ("a,b\n1,2\n", [], "no column 'url'"),
        ('{"url": "http://x/1.jpg"}\nnot json\n', [], "line 2 is not valid JSON"),
        ("url\nhttp://x/1.jpg\n", ["crawl.shard_sise=5"], "shard_sise"),
        ("url\nhttp://x/1.jpg\n", ["crawl.resize_mode=stretch"], "resize_mode"),
        ("url\nhttp://x/1.jpg\n", ["crawl.image_size=big"], "image_size"),
        (
            "url\nhttp://x/1.jpg\n",
            ["dedup.phash_threshold=-1"],
            "dedup.phash_threshold must be in 0..63",
        ),
        (
            "url\nhttp://x/1.jpg\n",
            ["dedup.phash_threshold=64"],
            "dedup.phash_threshold must be in 0..63",
        ),
        ("url\nhttp://x/1.jpg\n", ["ray.cpus_per_task=0"], "ray.cpus_per_task must be > 0"),
        (
            "url\nhttp://x/1.jpg\n",
            ["ray.max_tasks_in_flight=-2"],
            "ray.max_tasks_in_flight must be >= 0",
        ),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(content, overrides, message, tmp_path):
    suffix = ".jsonl" if content and content.startswith("{") else ".csv"
    path = tmp_path / f"urls{suffix}"
    if content is not None:
        path.write_text(content)
    args = [f"input.urls={path}", f"output_dir={tmp_path / 'run'}", *overrides]
    with pytest.raises((InputError, ConfigError)) as exc:
        prepare_run(CONFIG, args)
    assert message in str(exc.value)
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_input_with_exit_code_2_and_starts_no_ray(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", CONFIG, f"input.urls={tmp_path}/nope.parquet",
         f"output_dir={tmp_path / 'run'}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert "input.urls file not found" in run.stderr and "Ray" not in run.stderr


def test_resume_with_other_shard_size_is_refused(tmp_path):
    from pipeline import plan
    from pipeline.layout import RunLayout

    path = _write(tmp_path / "urls.txt", "txt")
    args = [f"input.urls={path}", f"output_dir={tmp_path / 'run'}"]
    cfg, _ = prepare_run(CONFIG, args)
    plan.mark(RunLayout(cfg.output_dir), cfg, "crawl", "running")  # a killed first run
    with pytest.raises(
        ConfigError, match=r"stage 'crawl' ran with crawl.shard_size=10000 \(now 7\)"
    ):
        prepare_run(CONFIG, [*args, "crawl.shard_size=7"])
    # Settings outside the crawl's output (timeouts, threads) may change on resume.
    prepare_run(CONFIG, [*args, "crawl.threads_per_task=3", "crawl.read_timeout_s=2"])
    # redo=[crawl] is the documented way to start the stage (and all later ones) afresh.
    prepare_run(CONFIG, [*args, "crawl.shard_size=7", "redo=[crawl]"])


def _image(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 200), color).save(out, format="PNG")
    return out.getvalue()


def test_folder_and_tar_sources(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (folder / ("sub" if i else "") / f"{i}.png").write_bytes(_image(color))
    (folder / "notes.txt").write_text("ignored")
    tar_path = tmp_path / "src-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(2):
            data = _image((i * 100, 50, 50))
            info = tarfile.TarInfo(f"sample{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            meta = tarfile.TarInfo(f"sample{i}.txt")
            meta.size = 2
            tar.addfile(meta, io.BytesIO(b"hi"))
    cfg = CrawlConfig(image_size=64)
    for index, (kind, source) in enumerate(
        [("folder", str(folder)), ("tars", str(tmp_path / "src-*.tar"))]
    ):
        inp = InputConfig(
            kind=kind,
            folder=source if kind == "folder" else "",
            tars=source if kind == "tars" else "",
        )
        ((_, table),) = list(iter_shards(inp, 100))
        crawl_shard(table, index, tmp_path / "out", cfg, kind)
        rows = pq.read_table(tmp_path / "out" / f"{index:05d}.parquet").to_pylist()
        assert [r["status"] for r in rows] == ["success"] * (3 if kind == "folder" else 2)
        assert {(r["width"], r["height"]) for r in rows} == {(102, 64)}
    with pytest.raises(InputError, match="not a directory"):
        check_input(InputConfig(kind="folder", folder=str(tmp_path / "missing")))
    with pytest.raises(InputError, match="matches no files"):
        check_input(InputConfig(kind="tars", tars=str(tmp_path / "none-*.tar")))


def test_unreadable_and_oversized_local_files_are_recorded_rows(tmp_path):
    """A file gone between listing and crawling, one over crawl.max_bytes, a tar cut short and a
    member over the cap: each is its row's error (not an internal error), the rest succeed."""
    folder = tmp_path / "images"
    folder.mkdir()
    good = _image((10, 200, 30))
    for name, data in (("a.png", good), ("b.png", good + b"\0" * 5_000), ("gone.png", good)):
        (folder / name).write_bytes(data)
    ((_, table),) = list(iter_shards(InputConfig(kind="folder", folder=str(folder)), 100))
    (folder / "gone.png").unlink()
    cfg = CrawlConfig(image_size=64, max_bytes=len(good) + 1_000)
    crawl_shard(table, 0, tmp_path / "out", cfg, "folder")
    rows = {
        Path(r["url"]).name: r for r in pq.read_table(tmp_path / "out/00000.parquet").to_pylist()
    }
    assert (rows["a.png"]["status"], rows["b.png"]["error_type"]) == ("success", "too_large")
    assert rows["gone.png"]["error_type"] == "read_error"
    assert "gone.png" in rows["gone.png"]["error_message"]

    tar_path = tmp_path / "src-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("ok.png", good), ("big.png", good + b"\0" * 5_000), ("cut.png", good)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ((_, table),) = list(iter_shards(InputConfig(kind="tars", tars=str(tar_path)), 100))
    cut_at = table.to_pylist()[2]["tar_offset"] + 100  # the last member loses all but 100 bytes
    with open(tar_path, "r+b") as f:
        f.truncate(cut_at)
    crawl_shard(table, 1, tmp_path / "out", cfg, "tars")
    rows = {
        r["url"].split("#")[1]: r for r in pq.read_table(tmp_path / "out/00001.parquet").to_pylist()
    }
    assert rows["ok.png"]["status"] == "success"
    assert rows["big.png"]["error_type"] == "too_large"
    assert rows["cut.png"]["error_type"] == "read_error"
    assert "bytes early" in rows["cut.png"]["error_message"]


def test_special_files_named_as_images_neither_hang_nor_read_forever(tmp_path):
    """A FIFO named x.jpg (a plain open would block for good) is not listed, and when it
    replaces an image after the listing it is its row's read_error; so is a symlink to
    /dev/zero (it would read forever), listed or put in place later. A FIFO named x.tar among
    the input tars is not one of them."""
    folder = tmp_path / "images"
    folder.mkdir()
    good = _image((10, 200, 30))
    for name in ("a.png", "later-fifo.png", "later-zero.png"):
        (folder / name).write_bytes(good)
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    ((_, table),) = list(iter_shards(InputConfig(kind="folder", folder=str(folder)), 100))
    assert sorted(Path(u).name for u in table["url"].to_pylist()) == [
        "a.png",
        "later-fifo.png",
        "later-zero.png",
        "zero",
    ]  # fmt: skip (the symlink is listed by its target's path, /dev/zero)
    (folder / "later-fifo.png").unlink()
    os.mkfifo(folder / "later-fifo.png")
    (folder / "later-zero.png").unlink()
    os.symlink("/dev/zero", folder / "later-zero.png")
    crawl_shard(table, 0, tmp_path / "out", CrawlConfig(image_size=64), "folder")
    rows = {
        Path(r["url"]).name: r for r in pq.read_table(tmp_path / "out/00000.parquet").to_pylist()
    }
    assert rows["a.png"]["status"] == "success"
    for name in ("later-fifo.png", "later-zero.png", "zero"):
        assert rows[name]["error_type"] == "read_error"
        assert "not a regular file" in rows[name]["error_message"]
    tars = tmp_path / "tars"
    tars.mkdir()
    with tarfile.open(tars / "a.tar", "w") as tar:
        info = tarfile.TarInfo("a.png")
        info.size = len(good)
        tar.addfile(info, io.BytesIO(good))
    os.mkfifo(tars / "b.tar")
    ((_, table),) = list(iter_shards(InputConfig(kind="tars", tars=str(tars / "*.tar")), 100))
    assert [u.split("#")[0] for u in table["url"].to_pylist()] == [str(tars / "a.tar")]


def test_compressed_input_tars_are_a_clear_error(tmp_path):
    """Members are read by their offset in the file: a gzip tar's offsets are into the
    decompressed stream, so it is refused up front rather than crawled as garbage."""
    with tarfile.open(tmp_path / "src.tar", "w:gz") as tar:
        data = _image((1, 2, 3))
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match="not a readable uncompressed tar"):
        list(iter_shards(InputConfig(kind="tars", tars=str(tmp_path / "src.tar")), 100))


def test_retry_failed_fetches_again_a_success_whose_image_is_gone(tmp_path):
    """retry_failed reuses a success only while the old tar still holds its image: one lost from
    the tar (here: the tar rewritten without it) is crawled again, not kept as a success
    without an image; nothing is reused from a shard crawled from other URLs."""
    from pipeline.shardio import TarSink, iter_tar_samples, read_stats

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_image((i * 80, 10, 10)))
    ((_, table),) = list(iter_shards(InputConfig(kind="folder", folder=str(folder)), 100))
    out = tmp_path / "out"
    cfg = CrawlConfig(image_size=64, retry_failed=True)
    crawl_shard(table, 0, out, cfg, "folder")
    samples = dict(iter_tar_samples(out / "00000.tar"))
    keys = sorted(samples)
    sink = TarSink(out / "00000.tar")  # the first sample's members lost
    for key in keys[1:]:
        sink.add(key, samples[key]["jpg"], json.loads(samples[key]["json"]))
    sink.commit()
    stats = crawl_shard(table, 0, out, cfg, "folder")
    assert stats["successes"] == 3
    again = dict(iter_tar_samples(out / "00000.tar"))
    assert sorted(again) == keys and again[keys[0]]["jpg"] == samples[keys[0]]["jpg"]
    # The same shard index over other URLs: a success of the old shard is not taken for a row.
    other = pa.table({"url": [str(folder / "2.png"), str(folder / "1.png"), str(folder / "0.png")]})
    crawl_shard(other, 0, out, cfg, "folder")
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    redone = dict(iter_tar_samples(out / "00000.tar"))
    assert [Path(r["url"]).name for r in rows] == ["2.png", "1.png", "0.png"]
    assert redone[rows[0]["key"]]["jpg"] == samples[keys[2]]["jpg"]
    assert read_stats(out / "00000.stats.json")["successes"] == 3


@pytest.mark.parametrize(
    "change, named",
    [("semdedup.imi_bits=3", "semdedup.imi_bits=0 (now 3)"),
     ("curate.retrieval_ivf_min_size=10", "curate.retrieval_ivf_min_size=1000000 (now 10)"),
     ("curate.retrieval_pq_m=8", "curate.retrieval_pq_m=0 (now 8)")],
)  # fmt: skip
def test_index_settings_that_change_results_are_checked_on_a_rerun(change, named, tmp_path):
    """An approximate index's shape changes which neighbours are found: a rerun with another
    value must be refused like any other output-defining setting, not silently skipped."""
    from pipeline import plan
    from pipeline.config import PipelineConfig
    from pipeline.layout import RunLayout
    from pretrain.configtools import load_config

    curate = str(REPO / "configs/pipeline/curate.yaml")
    base = [f"output_dir={tmp_path / 'run'}", "stages=[semdedup,cluster,curate]"]
    layout = RunLayout(tmp_path / "run")
    cfg = load_config(PipelineConfig, curate, base)
    for stage in ("crawl", "dedup", "embed", "semdedup", "curate"):  # as a finished run has them
        plan.mark(layout, cfg, stage, "done")
    plan.check_plan(cfg, layout)  # the same settings: fine
    with pytest.raises(ConfigError, match=re.escape(named)):
        plan.check_plan(load_config(PipelineConfig, curate, [*base, change]), layout)


def test_crawl_workers_do_not_import_torch():
    """Each Ray worker that runs a crawl task imports the crawl stage: torch costs it seconds and
    hundreds of MB. The shared tar reader lives in pretrain.data, whose package imports its
    torch parts only on use."""
    code = (
        "import sys, pipeline.stages.crawl, pipeline.shardio, pipeline.manifest, pipeline.sources\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
