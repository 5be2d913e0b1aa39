"""The write stage without Ray: curated shards copied byte for byte from two small crawl-format
tars, planned, written, validated, tampered with, killed mid-write and resumed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.stages.write as W
from pipeline.layout import RunLayout, crawl_shard_files
from pipeline.shardio import TarSink, iter_tar_samples

SHARD_SIZE = 3
SEED = 7
# key -> multiplicity; 000000001 and 000010002 are in the crawl but not selected
SELECTION = {
    "000000000": 1,
    "000000002": 1,
    "000000003": 2,
    "000010000": 1,
    "000010001": 1,
    "000010003": 1,
}


def _jpeg(seed: int) -> tuple[bytes, int, int]:
    rng = np.random.default_rng(seed)
    w, h = 16 + 4 * seed, 12 + 2 * seed
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue(), w, h


def _crawl_meta(key: str, jpeg: bytes, w: int, h: int) -> dict:
    return {
        "key": key, "url": f"http://example.test/{key}.jpg", "status": "success",
        "http_status": 200, "width": w, "height": h, "original_width": 2 * w,
        "original_height": 2 * h, "sha256": hashlib.sha256(b"orig" + jpeg).hexdigest(),
        "bytes": 1000 + len(jpeg), "phash": f"{int(key):016x}",
        "jpg_sha256": hashlib.sha256(jpeg).hexdigest(), "caption": f"image {key}",
    }  # fmt: skip


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """Two crawl tars (4 samples each) in RUN/crawl; returns (crawl_dir, key -> (jpeg, meta))."""
    crawl_dir = tmp_path_factory.mktemp("run") / "crawl"
    crawl_dir.mkdir()
    samples = {}
    for shard in range(2):
        sink = TarSink(crawl_shard_files(crawl_dir, shard).tar)
        for row in range(4):
            key = f"{shard:05d}{row:04d}"
            jpeg, w, h = _jpeg(4 * shard + row)
            meta = _crawl_meta(key, jpeg, w, h)
            sink.add(key, jpeg, meta)
            samples[key] = (jpeg, meta)
        sink.commit()
    return crawl_dir, samples


def _fields() -> dict[str, dict]:
    out = {}
    for i, (key, m) in enumerate(sorted(SELECTION.items())):
        retrieval = i % 3 == 0
        out[key] = {
            "cluster_1": np.int64(10 + i), "cluster_2": np.int32(i % 2),
            "selected_by": "retrieval" if retrieval else "balanced",
            "query_key": f"seed_{i:05d}" if retrieval else None,
            "distance": np.float32(0.125 * i) if retrieval else None, "multiplicity": m,
        }  # fmt: skip
    return out


def _plan(seed: int = SEED) -> list[list[tuple[str, str]]]:
    keys = list(SELECTION)
    return W.plan_shards(keys, [SELECTION[k] for k in keys], SHARD_SIZE, seed)


def _write_all(crawl_dir: Path, shards_dir: Path, plan, fields=None) -> list[dict]:
    fields = _fields() if fields is None else fields
    sources = W.crawl_sources(crawl_dir, {src for entries in plan for _, src in entries})
    index = {p: W.tar_member_index(p) for p in set(sources.values())}
    return [
        W.write_curated_shard(entries, W.curated_shard_path(shards_dir, i), sources, index, fields)
        for i, entries in enumerate(plan)
    ]


def _manifest(crawl, plan) -> list[dict]:
    _, samples = crawl
    return W.curated_manifest_rows(
        plan, _fields(), {k: meta["jpg_sha256"] for k, (_, meta) in samples.items()}
    )


@pytest.fixture
def written(crawl, tmp_path):
    plan = _plan()
    shards_dir = RunLayout(tmp_path / "run").curated_shards_dir
    markers = _write_all(crawl[0], shards_dir, plan)
    return plan, shards_dir, markers


# --- planning ------------------------------------------------------------------------------------


def test_plan_shards_sizes_repeats_and_seed():
    plan = _plan()
    assert [len(s) for s in plan] == [3, 3, 1]
    entries = [e for s in plan for e in s]
    assert sorted(src for _, src in entries) == sorted(
        k for k, m in SELECTION.items() for _ in range(m)
    )
    assert len({out for out, _ in entries}) == len(entries) == 7
    assert {out for out, src in entries if src == "000000003"} == {"000000003", "000000003_r1"}
    assert all(out == src for out, src in entries if src != "000000003")
    assert _plan() == plan  # deterministic
    assert _plan(SEED + 1) != plan  # another seed, another order
    keys = list(SELECTION)[::-1]  # the input order does not matter
    assert W.plan_shards(keys, [SELECTION[k] for k in keys], SHARD_SIZE, SEED) == plan
    assert W.plan_shards(["a", "b"], [0, 2], 5, 0) in (
        [[("b", "b"), ("b_r1", "b")]],
        [[("b_r1", "b"), ("b", "b")]],
    )  # multiplicity 0: not written
    assert W.plan_shards([], [], 3, 0) == []
    assert W.parse_output_key("000000003_r12") == ("000000003", 12)
    assert W.parse_output_key("000000003") == ("000000003", 0)


@pytest.mark.parametrize(
    "keys, mult, size, match",
    [
        (["a", "b"], [1], 3, "multiplicities"),
        (["a", "a"], [1, 1], 3, "twice"),
        (["a"], [-1], 3, ">= 0"),
        (["a"], [1], 0, "shard_size"),
        (["a.b"], [1], 3, "bad source key"),
        (["a_r1"], [1], 3, "repeat key"),
    ],
)
def test_plan_shards_rejects_bad_input(keys, mult, size, match):
    with pytest.raises(ValueError, match=match):
        W.plan_shards(keys, mult, size, 0)


# --- reading and writing -----------------------------------------------------------------------


def test_tar_member_index_reads_members_by_offset(crawl):
    crawl_dir, samples = crawl
    tar = crawl_shard_files(crawl_dir, 1).tar
    index = W.tar_member_index(tar)
    assert sorted(index) == [k for k in sorted(samples) if k.startswith("00001")]
    with open(tar, "rb") as f:
        for key, members in index.items():
            assert set(members) == {"jpg", "json"}
            f.seek(members["jpg"][0])
            assert f.read(members["jpg"][1]) == samples[key][0]
            f.seek(members["json"][0])
            assert json.loads(f.read(members["json"][1])) == samples[key][1]


def test_write_copies_bytes_and_extends_json(crawl, written):
    _, samples = crawl
    plan, shards_dir, markers = written
    fields = _fields()
    seen = []
    for i, entries in enumerate(plan):
        tar = W.curated_shard_path(shards_dir, i)
        assert tar.name == f"{i:06d}.tar"
        got = list(iter_tar_samples(tar))
        assert [k for k, _ in got] == [out for out, _ in entries]  # the plan's order
        for (out, src), (_, files) in zip(entries, got):
            jpeg, crawl_meta = samples[src]
            assert files["jpg"] == jpeg  # no re-encoding
            meta = json.loads(files["json"])
            for field, value in crawl_meta.items():
                assert meta[field] == value  # crawl fields unchanged
            expected = W._plain(fields[src])
            assert {f: meta[f] for f in expected} == expected
            assert meta["source_key"] == src
            assert meta["repeat_index"] == (1 if out.endswith("_r1") else 0)
        with tarfile.open(tar) as t:  # USTAR, mtime 0, jpg then json per sample
            members = t.getmembers()
            assert all(m.mtime == 0 for m in members)
            assert [m.name for m in members] == [f"{k}.{e}" for k, _ in entries for e in ("jpg", "json")]  # fmt: skip
        raw = tar.read_bytes()  # every header is plain USTAR (no PAX / GNU extension)
        assert all(raw[m.offset + 257 : m.offset + 265] == b"ustar\x0000" for m in members)
        marker = json.loads(W.done_path(tar).read_text())
        assert marker == markers[i]
        assert marker["count"] == len(entries)
        assert marker["keys"] == [out for out, _ in entries]
        assert marker["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert W.shard_done(tar, entries, fields)
        seen += marker["keys"]
    assert sorted(seen) == sorted(out for entries in plan for out, _ in entries)
    assert not list(shards_dir.glob(".*.tmp"))


def test_write_is_byte_reproducible(crawl, written, tmp_path):
    plan, shards_dir, markers = written
    again = _write_all(crawl[0], tmp_path / "again", plan)
    assert [m["sha256"] for m in again] == [m["sha256"] for m in markers]


def test_member_index_optional_and_keyed_by_str(crawl, tmp_path):
    plan = _plan()
    crawl_dir = crawl[0]
    sources = W.crawl_sources(crawl_dir, {s for e in plan for _, s in e})
    by_str = {str(p): W.tar_member_index(p) for p in set(sources.values())}
    a = W.write_curated_shard(plan[0], tmp_path / "a" / "000000.tar", sources, by_str, _fields())
    b = W.write_curated_shard(plan[0], tmp_path / "b" / "000000.tar", sources, None, _fields())
    assert a["sha256"] == b["sha256"]


def test_missing_source_raises_naming_shard_and_key(crawl, tmp_path):
    crawl_dir = crawl[0]
    out = tmp_path / "shards" / "000004.tar"
    entries = [("000000000", "000000000"), ("000000009", "000000009")]  # row 9 was never crawled
    sources = W.crawl_sources(crawl_dir, [k for _, k in entries])
    with pytest.raises(W.CuratedShardError, match="000004.*000000009.*missing from crawl tar") as e:
        W.write_curated_shard(entries, out, sources, None, _fields())
    assert (e.value.shard, e.value.key) == ("000004", "000000009")
    again = pickle.loads(pickle.dumps(e.value))  # crosses Ray's process boundary
    assert str(again) == str(e.value)
    with pytest.raises(W.CuratedShardError, match="000000002.*no crawl tar"):
        W.write_curated_shard([("000000002", "000000002")], out, {}, None, _fields())
    gone = {"000000000": tmp_path / "nope.tar"}
    with pytest.raises(W.CuratedShardError, match="unreadable"):
        W.write_curated_shard([("000000000", "000000000")], out, gone, None, _fields())
    assert list(out.parent.iterdir()) == []  # no temp file, no tar, no marker


def test_corrupt_source_and_clobbering_field_raise(crawl, tmp_path):
    _, samples = crawl
    jpeg, meta = samples["000000000"]
    bad = tmp_path / "crawl" / "00000.tar"
    bad.parent.mkdir()
    sink = TarSink(bad)
    sink.add("000000000", jpeg[:-10] + b"\0" * 10, meta)  # recorded hash no longer matches
    sink.commit()
    entries = [("000000000", "000000000")]
    out = tmp_path / "shards" / "000000.tar"
    with pytest.raises(W.CuratedShardError, match="000000.*000000000.*jpg_sha256"):
        W.write_curated_shard(entries, out, {"000000000": bad}, None, _fields())
    good = W.crawl_sources(crawl[0], ["000000000"])
    with pytest.raises(W.CuratedShardError, match="url.*overwrite"):
        W.write_curated_shard(entries, out, good, None, {"000000000": {"url": "x"}})
    with pytest.raises(W.CuratedShardError, match="does not name its source"):
        W.write_curated_shard([("000000001", "000000000")], out, good, None, _fields())
    with pytest.raises(W.CuratedShardError, match="000000000: no curation fields"):
        W.write_curated_shard(entries, out, good, None, {})
    assert not out.exists() and not W.done_path(out).exists()


# --- validation ----------------------------------------------------------------------------------


def test_validate_clean_then_tampered(crawl, written):
    plan, shards_dir, _ = written
    rows = _manifest(crawl, plan)
    assert len(rows) == 7
    assert W.validate_curated(shards_dir, rows) == []

    # 1. one JSON changed (the tar rewritten, so its marker no longer matches either)
    tar0 = W.curated_shard_path(shards_dir, 0)
    samples = list(iter_tar_samples(tar0))
    first = samples[0][0]
    tmp = tar0.with_name("rewrite.tmp.tar")
    sink = TarSink(tmp)
    for key, files in samples:
        meta = json.loads(files["json"])
        if key == first:
            meta["selected_by"] = "tampered"
        sink.add(key, files["jpg"], meta)
    sink.commit()
    os.replace(tmp, tar0)
    # 2. one tar dropped
    W.curated_shard_path(shards_dir, 1).unlink()
    # 3. one JPEG corrupted in place (its first bytes: no longer a JPEG)
    tar2 = W.curated_shard_path(shards_dir, 2)
    (key2, members), = W.tar_member_index(tar2).items()  # fmt: skip
    with open(tar2, "r+b") as f:
        f.seek(members["jpg"][0])
        f.write(b"\0" * 16)
    # 4. an extra tar
    shutil.copy(tar2, shards_dir / "000099.tar")

    problems = W.validate_curated(shards_dir, rows)
    text = "\n".join(problems)
    assert f"000000: {first} json selected_by='tampered' != manifest" in text
    assert "000000: tar sha256 does not match its done marker" in text
    assert "000001: tar missing" in text
    assert f"000002: {key2} jpg bytes do not match the crawl's jpg_sha256" in text
    assert f"000002: {key2} jpg does not decode" in text
    assert "000002: tar sha256 does not match its done marker" in text
    assert "000099.tar: extra tar" in text
    assert len(problems) == 7, problems


def test_validate_reports_key_and_marker_mismatches(crawl, written):
    plan, shards_dir, _ = written
    rows = _manifest(crawl, plan)
    moved = dict(rows[0], shard=2)  # the manifest puts a sample in another shard
    problems = W.validate_curated(shards_dir, [moved] + rows[1:])
    assert f"000000: {rows[0]['key']} in the tar but not in the manifest" in problems
    assert f"000002: {rows[0]['key']} in the manifest but not in the tar" in problems
    swapped = rows[:3][::-1] + rows[3:]  # same keys, another order
    assert W.validate_curated(shards_dir, swapped) == [
        "000000: samples not in the manifest's order"
    ]
    W.done_path(W.curated_shard_path(shards_dir, 1)).unlink()
    assert W.validate_curated(shards_dir, rows) == ["000001: no done marker (partial shard)"]


def test_validate_accepts_a_runner_style_manifest(crawl, written):
    """Rows as the runner builds them: the crawl parquet's row of the source (phash as an int,
    error columns null), the curation fields, shard as "NNNNNN", no repeat_index column."""
    _, samples = crawl
    plan, shards_dir, _ = written
    fields = _fields()
    rows = []
    for i, entries in enumerate(plan):
        for out, src in entries:
            crawl_row = dict(samples[src][1], phash=int(src), error_type=None, error_message=None)
            crawl_row.pop("caption")  # an input extra the crawl parquet does not keep here
            row = {**crawl_row, **W._plain(fields[src]), "source_key": src}
            rows.append(dict(row, key=out, shard=f"{i:06d}"))
    assert W.validate_curated(shards_dir, rows) == []
    rows[0] = dict(rows[0], url="http://elsewhere.test/x.jpg", multiplicity=5)
    problems = W.validate_curated(shards_dir, rows)
    assert [p.split(" json ")[1].split("=")[0] for p in problems] == ["multiplicity", "url"]
    assert W.validate_curated(shards_dir, rows, curation_columns=["selected_by"]) == problems[1:]
    assert all(W.shard_done(W.curated_shard_path(shards_dir, i), e) for i, e in enumerate(plan))


# --- kill and resume -----------------------------------------------------------------------------


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _killed_child(write) -> None:
    """Run ``write`` in a forked child and require that it died of SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            write()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


class _KilledBeforeRename(TarSink):
    def commit(self) -> None:
        self._out.close()
        _die()


def test_sigkill_then_clear_partial_and_rerun(crawl, tmp_path):
    crawl_dir = crawl[0]
    plan, fields = _plan(), _fields()
    shards_dir = RunLayout(tmp_path / "run").curated_shards_dir
    sources = W.crawl_sources(crawl_dir, {s for e in plan for _, s in e})
    index = {p: W.tar_member_index(p) for p in set(sources.values())}
    tars = [W.curated_shard_path(shards_dir, i) for i in range(len(plan))]
    W.write_curated_shard(plan[0], tars[0], sources, index, fields)

    def killed_at_marker():  # the tar renamed into place, its marker never written
        W.write_stats = lambda *a: _die()
        W.write_curated_shard(plan[1], tars[1], sources, index, fields)

    def killed_mid_tar():  # a temporary file left behind
        W.TarSink = _KilledBeforeRename
        W.write_curated_shard(plan[2], tars[2], sources, index, fields)

    _killed_child(killed_at_marker)
    _killed_child(killed_mid_tar)
    temps = list(shards_dir.glob(".*.tmp"))
    assert len(temps) == 1 and tars[1].exists() and not W.done_path(tars[1]).exists()
    assert not tars[2].exists()
    assert [W.shard_done(t, e, fields) for t, e in zip(tars, plan)] == [True, False, False]

    removed = W.clear_partial(shards_dir)
    assert sorted(removed) == sorted(temps + [tars[1]])
    assert sorted(p.name for p in shards_dir.iterdir()) == ["000000.done.json", "000000.tar"]

    # the rerun writes what is not done; the finished shard is kept as it is
    kept = tars[0].stat().st_mtime_ns
    for tar, entries in zip(tars, plan):
        if not W.shard_done(tar, entries, fields):
            W.write_curated_shard(entries, tar, sources, index, fields)
    assert tars[0].stat().st_mtime_ns == kept
    keys = [k for t in tars for k, _ in iter_tar_samples(t)]
    assert sorted(keys) == sorted(out for e in plan for out, _ in e)  # complete, no duplicates
    assert W.validate_curated(shards_dir, _manifest(crawl, plan)) == []
    # a rewrite of a done shard killed before its new marker: the old marker is gone already
    changed = {**fields, plan[0][0][1]: {**fields[plan[0][0][1]], "selected_by": "x"}}

    def rewrite_killed_at_marker():
        W.write_stats = lambda *a: _die()
        W.write_curated_shard(plan[0], tars[0], sources, index, changed)

    _killed_child(rewrite_killed_at_marker)
    assert tars[0].exists() and not W.done_path(tars[0]).exists()
    assert W.clear_partial(shards_dir) == [tars[0]]
    W.write_curated_shard(plan[0], tars[0], sources, index, fields)
    assert W.validate_curated(shards_dir, _manifest(crawl, plan)) == []
    # changed fields or a changed plan: the marker no longer counts
    assert not W.shard_done(tars[0], plan[0], {**fields, plan[0][0][1]: {"selected_by": "x"}})
    assert not W.shard_done(tars[0], plan[0][::-1], fields)


def test_clear_partial_removes_orphan_markers(tmp_path):
    (tmp_path / "000003.done.json").write_text("{}")
    (tmp_path / "000004.tar").write_bytes(b"")
    assert sorted(p.name for p in W.clear_partial(tmp_path)) == ["000003.done.json", "000004.tar"]
    assert W.clear_partial(tmp_path / "absent") == []


# --- reading back --------------------------------------------------------------------------------


def test_webdataset_reads_every_sample(crawl, written):
    wds = pytest.importorskip("webdataset")
    _, samples = crawl
    plan, shards_dir, _ = written
    urls = [str(W.curated_shard_path(shards_dir, i)) for i in range(len(plan))]
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        assert sample["jpg"].size == (meta["width"], meta["height"])
        assert meta["source_key"] in samples
        got[sample["__key__"]] = meta["source_key"]
    assert got == {out: src for e in plan for out, src in e}


def test_tar_sink_writes_what_tarfile_writes(tmp_path):
    """TarSink builds USTAR headers itself (for speed): the archive is byte for byte the one
    ``tarfile`` writes for the same members, names of every length handled, and reads back."""
    from pipeline.shardio import ustar_header

    rng = np.random.default_rng(0)
    members = [(f"{i:09d}.{ext}", rng.bytes(int(n))) for i, (ext, n) in enumerate(
        zip(["jpg", "json"] * 20, rng.integers(0, 3000, 40))
    )] + [("x" * 100, b"a"), ("y" * 140 + "/z.jpg", b"b"), ("dir/\u00e9.json", b"{}"),
          ("empty.jpg", b""), ("block.jpg", b"q" * 512)]  # fmt: skip
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    sink = TarSink(tmp_path / "x.tar")
    for name, data in members:
        sink._member(ustar_header(name, len(data)), data)
    sink.commit()
    assert (tmp_path / "x.tar").read_bytes() == ref.getvalue()
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members
    assert len(ustar_header("k.jpg", 8**11 - 1)) == 512
    with pytest.raises(ValueError):
        ustar_header("k.jpg", 8**11)  # too large for USTAR's size field: refused, as tarfile does


def test_a_cut_shard_is_not_done_and_shards_beyond_the_plan_are_removed(written):
    plan, shards_dir, _ = written
    tars = [W.curated_shard_path(shards_dir, i) for i in range(len(plan))]
    assert all(W.shard_done(t, e) for t, e in zip(tars, plan))
    size = tars[0].stat().st_size
    with open(tars[0], "r+b") as f:  # cut at a record boundary: still a readable, shorter tar
        f.truncate(size - 1024)
    assert not W.shard_done(tars[0], plan[0]) and W.shard_done(tars[1], plan[1])

    # a smaller selection written over a larger one: shards numbered from its count go
    extra = W.curated_shard_path(shards_dir, len(plan))
    shutil.copy(tars[1], extra)
    shutil.copy(W.done_path(tars[1]), W.done_path(extra))
    removed = W.remove_beyond(shards_dir, len(plan) - 1)
    assert sorted(p.name for p in removed) == sorted(
        [tars[-1].name, W.done_path(tars[-1]).name, extra.name, W.done_path(extra).name]
    )
    assert sorted(p.name for p in shards_dir.glob("*.tar")) == [t.name for t in tars[:-1]]
