"""End to end through the CLI on the shared Ray cluster: shards, manifests, dedup, validate,
resume after SIGKILL, retry_failed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/pipeline/crawl.yaml")


def _cli(*args: str, address: str | None = None, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if address:
        env["RAY_ADDRESS"] = address
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240, **popen)  # fmt: skip


def _run_args(urls: Path, out: Path, *extra: str) -> list[str]:
    return ["run", CONFIG, f"input.urls={urls}", f"output_dir={out}", "crawl.shard_size=16",
            "crawl.allow_private_networks=true", "crawl.threads_per_task=8", *extra]  # fmt: skip


def _successful_keys(run_dir: Path) -> dict[str, str]:
    keys = {}
    for parquet in sorted((run_dir / "crawl").glob("*.parquet")):
        for row in pq.read_table(parquet, columns=["key", "url", "status"]).to_pylist():
            if row["status"] == "success":
                keys[row["key"]] = row["url"]
    return keys


def test_crawl_dedup_manifest(image_server, small_web, url_file, ray_address, tmp_path):
    paths = small_web.paths()
    urls = url_file(tmp_path / "urls.parquet", [image_server.url(p) for p in paths],
                    caption=[f"caption {p}" for p in paths])  # fmt: skip
    out = tmp_path / "run"
    result = _cli(*_run_args(urls, out), address=ray_address)
    assert result.returncode == 0, result.stderr[-3000:]

    n = len(paths)  # 48 images + 3 broken -> 4 shards of <= 16
    assert sorted(p.name for p in (out / "crawl").glob("*.stats.json")) == [
        f"{i:05d}.stats.json" for i in range(4)
    ]
    table = pq.read_table(sorted((out / "crawl").glob("*.parquet")))
    assert table.num_rows == n and table["caption"].to_pylist()[0] == f"caption {paths[0]}"
    assert table["status"].to_pylist().count("success") == n - 3
    assert (out / "config.yaml").exists()

    # Dedup: exactly the planted duplicates, each pointing at its original.
    url_of = dict(zip(table["key"].to_pylist(), table["url"].to_pylist()))
    dedup = pq.read_table(out / "dedup" / "dedup.parquet").to_pylist()
    found = {
        url_of[r["key"]]: (url_of[r["duplicate_of"]], r["reason"])
        for r in dedup
        if r["duplicate_of"]
    }
    planted = {
        image_server.url(c): (image_server.url(o), "exact")
        for c, o in small_web.exact_duplicates.items()
    }
    planted |= {
        image_server.url(c): (image_server.url(o), "near")
        for c, o in small_web.near_duplicates.items()
    }
    assert found == planted

    summary = json.loads(_cli("manifest", "summary", str(out), "--json").stdout)
    assert summary["rows"] == n and summary["by_error"] == {"http_error": 3}
    assert summary["dedup"]["exact_duplicates"] == 4 and summary["dedup"]["near_duplicates"] == 4
    shards = json.loads(_cli("manifest", "shards", str(out), "--json").stdout)["shards"]
    assert [s["count"] for s in shards] == [16, 16, 16, 3]
    failures = json.loads(_cli("manifest", "failures", str(out), "--json").stdout)["failures"]
    assert failures[0]["error_type"] == "http_error" and failures[0]["count"] == 3
    assert _cli("manifest", "validate", str(out)).returncode == 0

    _tamper(out / "crawl" / "00001.tar")
    check = _cli("manifest", "validate", str(out), "--json")
    assert check.returncode == 1
    problems = json.loads(check.stdout)["problems"]
    assert problems and all(p.startswith("00001") for p in problems)

    # A sample appended a second time (`tar -r`): its key reads back once, the members twice.
    tar2 = out / "crawl" / "00002.tar"
    with tarfile.open(tar2) as archive:
        first = [m for m in archive.getmembers() if m.isfile()][:2]
        copies = [(m, archive.extractfile(m).read()) for m in first]
    with tarfile.open(tar2, "a") as archive:
        for member, data in copies:
            archive.addfile(member, io.BytesIO(data))
    problems = json.loads(_cli("manifest", "validate", str(out), "--json").stdout)["problems"]
    assert [p for p in problems if p.startswith("00002")] == [
        f"00002: tar member {m.name} appears 2 times" for m in sorted(first, key=lambda m: m.name)
    ]
    # Stray members (no field name, WebDataset's own `__` names): reading skips them, validate
    # names them.
    tar3 = out / "crawl" / "00003.tar"
    with tarfile.open(tar3, "a") as archive:
        for stray in ("README", "__meta__.json"):
            info = tarfile.TarInfo(stray)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"hi"))
    problems = json.loads(_cli("manifest", "validate", str(out), "--json").stdout)["problems"]
    assert [p for p in problems if p.startswith("00003")] == [
        f"00003: tar member {m} is no KEY.field sample member" for m in ("README", "__meta__.json")
    ]


def _tamper(tar_path: Path) -> None:
    """Replace one image's bytes with a re-encoded copy of the same size class."""
    members = []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read()))
    first_jpg = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg"))
    m, data = members[first_jpg]
    members[first_jpg] = (m, data[:-10] + b"\0" * 10)
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            m.size = len(data)
            import io

            tar.addfile(m, io.BytesIO(data))


def test_resume_after_sigkill_gives_the_same_keys(
    image_server, small_web, url_file, ray_address, tmp_path, wait
):
    paths = small_web.paths() * 2  # 102 rows -> 7 shards
    urls = url_file(tmp_path / "urls.parquet", [image_server.url(p) for p in paths])
    reference = tmp_path / "reference"
    assert (
        _cli(
            *_run_args(urls, reference, "ray.max_tasks_in_flight=1"), address=ray_address
        ).returncode
        == 0
    )

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=ray_address)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *_run_args(urls, killed, "ray.max_tasks_in_flight=1")],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    assert wait(lambda: len(list((killed / "crawl").glob("*.stats.json"))) >= 2, timeout_s=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "crawl").glob("*.stats.json")))
    assert done_before < 7, "the kill came too late to test anything"

    rerun = _cli(*_run_args(urls, killed, "ray.max_tasks_in_flight=1"), address=ray_address)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["crawl"]["skipped_shards"] >= done_before
    assert _successful_keys(killed) == _successful_keys(reference)
    assert len(_successful_keys(reference)) == 2 * (len(small_web.images))
    # Each tar is committed in key order, so the killed-and-resumed crawl wrote the very bytes
    # the uninterrupted one did, whatever order the fetches finished in.
    tars = sorted(p.name for p in (reference / "crawl").glob("*.tar"))
    assert len(tars) == 7 and tars == sorted(p.name for p in (killed / "crawl").glob("*.tar"))
    for name in tars:
        assert (killed / "crawl" / name).read_bytes() == (reference / "crawl" / name).read_bytes()
    assert not list((killed / "crawl").glob(".*.tmp"))
    assert _cli("manifest", "validate", str(killed)).returncode == 0


def test_retry_failed_reattempts_failed_rows(image_server, url_file, ray_address, tmp_path):
    urls = [image_server.url("img/000002.jpg"), image_server.url("fault/500-then-ok/retry-test"),
            image_server.url("fault/404")]  # fmt: skip
    url_path = url_file(tmp_path / "urls.parquet", urls)
    out = tmp_path / "run"
    first = _cli(*_run_args(url_path, out, "crawl.retries=0"), address=ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _successful_keys(out) == {"000000000": urls[0]}
    hits_before = image_server.hits["img/000002.jpg"]
    again = _cli(*_run_args(url_path, out, "crawl.retry_failed=true"), address=ray_address)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _successful_keys(out) == {"000000000": urls[0], "000000001": urls[1]}
    assert image_server.hits["img/000002.jpg"] == hits_before  # successes reused, not refetched
    assert _cli("manifest", "validate", str(out)).returncode == 0

    # The URL list edited in place, then the same command: the finished shard holds the images
    # of other URLs, so the run is refused instead of reusing them under the new URLs.
    url_file(url_path, [image_server.url("img/000003.jpg"), *urls[1:]])
    edited = _cli(*_run_args(url_path, out, "crawl.retry_failed=true"), address=ray_address)
    assert edited.returncode == 2
    assert "crawled from other URLs than the input now gives" in edited.stderr
    assert _successful_keys(out) == {"000000000": urls[0], "000000001": urls[1]}


def test_retry_failed_reopens_a_shard_whose_tar_lost_samples(
    image_server, small_web, url_file, ray_address, tmp_path
):
    """A shard with no failures is reopened by retry_failed when its tar no longer holds every
    success whole (a sample's members dropped; a tar cut inside its last image; one cut inside
    its last JSON): only those are fetched again or rebuilt, the rest copied, and the shards end
    byte-identical to the uninterrupted crawl's. A shard that lost nothing is skipped."""
    from pipeline.shardio import TarSink, iter_tar_samples, tar_member_index

    paths = sorted(small_web.images)  # 48 rows, no faults: 4 shards of 12
    urls = url_file(tmp_path / "urls.parquet", [image_server.url(p) for p in paths])
    out = tmp_path / "run"
    twelve = "crawl.shard_size=12"
    assert _cli(*_run_args(urls, out, twelve), address=ray_address).returncode == 0
    crawl = out / "crawl"
    reference = {t.name: t.read_bytes() for t in crawl.glob("*.tar")}
    assert len(reference) == 4
    samples = list(iter_tar_samples(crawl / "00000.tar"))
    lost_key = samples[5][0]
    sink = TarSink(crawl / "00000.tar")  # shard 0: one sample's members gone
    for key, files in samples:
        if key != lost_key:
            sink.add(key, files["jpg"], json.loads(files["json"]))
    sink.commit()
    for name, ext in (("00001.tar", "jpg"), ("00002.tar", "json")):  # cut inside the last one
        index = tar_member_index(crawl / name)
        offset, size = index[max(index)][ext]
        (crawl / name).write_bytes(reference[name][: offset + size // 2])
    assert _cli("manifest", "validate", str(out)).returncode == 1
    hits = dict(image_server.hits)

    rerun = _cli(*_run_args(urls, out, twelve, "crawl.retry_failed=true"), address=ray_address)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout)["crawl"]
    assert (report["crawled_shards"], report["skipped_shards"]) == (3, 1)
    assert {t.name: t.read_bytes() for t in crawl.glob("*.tar")} == reference
    lost_path = paths[int(lost_key[-4:])]  # a key is its row's position in the input
    assert image_server.hits[lost_path] == hits[lost_path] + 1
    refetched = sum(image_server.hits[p] - hits.get(p, 0) for p in paths)
    assert 2 <= refetched <= 3  # the lost sample, shard 1's last image (shard 2's may be reused)
    assert _cli("manifest", "validate", str(out)).returncode == 0


def test_a_shard_in_its_tail_lets_the_next_one_start(image_server, small_web, url_file,
                                                     ray_address, tmp_path):  # fmt: skip
    """Shards 0 and 1 end on two slow URLs each (2 s apiece, one thread a task): once their
    last row is in flight they stop holding the cluster's 2 CPUs, so shard 2 starts and ends
    while both still wait. Before, shard 2 could start only once one of them had finished."""
    images = [image_server.url(p) for p in sorted(small_web.images)[:8]]
    slow = image_server.url("fault/slow")
    urls = [*images[:2], slow, slow, *images[2:4], slow, slow, *images[4:8]]
    path = url_file(tmp_path / "urls.parquet", urls)
    out = tmp_path / "run"
    args = _run_args(path, out, "crawl.shard_size=4", "crawl.threads_per_task=1")
    result = _cli(*args, address=ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = {i: json.loads((out / "crawl" / f"{i:05d}.stats.json").read_text()) for i in range(3)}
    ended = {i: s["started_at"] + s["duration_s"] for i, s in stats.items()}
    assert [stats[i]["successes"] for i in range(3)] == [4, 4, 4]  # slow answers, late
    assert ended[2] < min(ended[0], ended[1]), stats
