"""Each fault endpoint of the loopback server is recorded with its reason, and none is fatal."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.shardio import iter_tar_samples, read_stats
from pipeline.stages.crawl import crawl_shard

EXPECTED = {
    "fault/404": ("failed", "http_error", 404),
    "fault/500-then-ok/1": ("success", None, 200),
    "fault/slow": ("failed", "timeout", None),
    "fault/truncated.jpg": ("failed", "decode_error", 200),
    "fault/html": ("failed", "not_image", 200),
    "fault/empty": ("failed", "empty_body", 200),
    "fault/bomb.png": ("failed", "decompression_bomb", 200),
    "fault/loop-a": ("failed", "redirect_loop", 302),
    "fault/big": ("failed", "too_large", 200),
    "fault/robots": ("failed", "robots_opt_out", 200),
    "fault/redirect": ("success", None, 200),
    "fault/drip": ("failed", "timeout", 200),
    "fault/404-drip": ("failed", "http_error", 404),
}


def test_every_fault_is_recorded_and_the_shard_completes(image_server, crawl_cfg, tmp_path):
    urls = [image_server.url(p) for p in EXPECTED] + [image_server.url("img/000000.jpg")]
    urls += ["ftp://127.0.0.1/x.jpg", "http://[not-a-host/x.jpg", "", "javascript:alert(1)"]
    table = pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]})
    before = dict(image_server.hits)  # the server is shared by the session's tests
    stats = crawl_shard(table, 0, tmp_path, crawl_cfg)

    rows = {r["url"]: r for r in pq.read_table(tmp_path / "00000.parquet").to_pylist()}
    assert len(rows) == len(urls) and stats["count"] == len(urls)
    for path, (status, error_type, http_status) in EXPECTED.items():
        row = rows[image_server.url(path)]
        assert (row["status"], row["error_type"]) == (status, error_type), (path, row)
        if http_status is not None:
            assert row["http_status"] == http_status, (path, row)
        if status == "failed":
            assert row["error_message"], path
    assert rows["ftp://127.0.0.1/x.jpg"]["error_type"] == "bad_scheme"
    assert rows["javascript:alert(1)"]["error_type"] == "bad_scheme"
    assert rows["http://[not-a-host/x.jpg"]["error_type"] == "bad_url"
    assert rows[""]["error_type"] == "bad_url"
    # Retried exactly once after the 500; 4xx never retried.
    hits = {path: n - before.get(path, 0) for path, n in image_server.hits.items()}
    assert hits["fault/500-then-ok/1"] == 2
    assert hits["fault/404"] == 1 and hits["fault/404-drip"] == 1
    # A host that timed out is not waited on again (crawl.retry_timeouts is off by default).
    assert hits["fault/slow"] == 1 and hits["fault/drip"] == 1
    # The tar holds exactly the successes, with carried columns in their JSON.
    samples = dict(iter_tar_samples(tmp_path / "00000.tar"))
    successes = {r["key"] for r in rows.values() if r["status"] == "success"}
    assert set(samples) == successes and len(successes) == 3
    assert read_stats(tmp_path / "00000.stats.json")["errors"]["http_error"] == 2


def test_private_and_metadata_addresses_refused_unless_allowed(image_server, crawl_cfg, tmp_path):
    crawl_cfg.allow_private_networks = False
    before = image_server.hits.get("img/000001.jpg", 0)
    urls = [image_server.url("img/000001.jpg"), "http://169.254.169.254/latest/meta-data/",
            "http://localhost:9/x.jpg", "http://10.0.0.1/x.jpg", "http://[::1]:80/x.jpg"]  # fmt: skip
    crawl_shard(pa.table({"url": urls}), 3, tmp_path, crawl_cfg)
    rows = pq.read_table(tmp_path / "00003.parquet").to_pylist()
    assert [r["error_type"] for r in rows] == ["blocked_address"] * len(urls)
    assert image_server.hits.get("img/000001.jpg", 0) == before  # refused before connecting


def test_redirect_to_private_address_is_refused(crawl_cfg):
    from pipeline.fetch import is_public_address

    for ip in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1", "fd00::1",
               "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1", "100.64.0.1", "192.0.2.1",
               "fd00:ec2::254"):  # fmt: skip
        assert not is_public_address(ip), ip
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700::1111")


def test_robots_directives_can_be_ignored(image_server, crawl_cfg, tmp_path):
    crawl_cfg.respect_robots_header = False
    crawl_shard(pa.table({"url": [image_server.url("fault/robots")]}), 0, tmp_path, crawl_cfg)
    assert pq.read_table(tmp_path / "00000.parquet")["status"].to_pylist() == ["success"]


def test_timeouts_are_retried_only_when_asked(image_server, crawl_cfg):
    from pipeline.fetch import Fetcher, FetchError

    for retry_timeouts, attempts in ((False, 1), (True, 2)):
        crawl_cfg.retry_timeouts = retry_timeouts
        before = image_server.hits.get("fault/slow", 0)
        with pytest.raises(FetchError) as err:
            Fetcher(crawl_cfg).fetch(image_server.url("fault/slow"))
        assert err.value.kind == "timeout"
        assert image_server.hits["fault/slow"] - before == attempts


def test_cpu_slots_bound_the_decoding_threads_and_change_no_output(
    image_server, small_web, crawl_cfg, tmp_path, monkeypatch
):
    """8 download threads, 2 CPU slots: never more than 2 rows decode at once, and the shard's
    manifest and tar are the same as with a slot per thread."""
    import threading
    import time

    from pipeline.stages import crawl as crawl_stage

    active, peak, lock = [0], [0], threading.Lock()
    real = crawl_stage.process_image

    def counted(data, cfg):  # the real decoder, with a count of the rows inside it
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.01)  # long enough for the other threads to pile up behind the slots
            return real(data, cfg)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(crawl_stage, "process_image", counted)
    table = pa.table({"url": [image_server.url(p) for p in small_web.paths()[:32]]})
    crawl_cfg.threads_per_task = 8
    # Both runs must see the same answers: no 1 s connect timeout on a busy test machine.
    crawl_cfg.connect_timeout_s = crawl_cfg.read_timeout_s = crawl_cfg.total_timeout_s = 20.0
    outputs = {}
    for slots in (2, 8):
        peak[0] = 0
        crawl_cfg.cpu_slots_per_task = slots
        crawl_shard(table, 0, tmp_path / str(slots), crawl_cfg)
        manifest = pq.read_table(tmp_path / str(slots) / "00000.parquet")
        outputs[slots] = (manifest, dict(iter_tar_samples(tmp_path / str(slots) / "00000.tar")))
        assert peak[0] <= slots
        if slots == 2:
            assert peak[0] == 2  # the bound was reached, so it was what held the rest back
    assert outputs[2][0].equals(outputs[8][0])
    assert outputs[2][1] == outputs[8][1]
