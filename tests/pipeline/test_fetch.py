"""The fetcher's DNS cache and address check, and a crawl that never waits on its slowest URL."""

from __future__ import annotations

import socket
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import CrawlConfig
from pipeline.fetch import Fetcher, FetchError
from pipeline.shardio import iter_tar_samples
from pipeline.stages.crawl import crawl_shard


class Resolver:
    """Stands in for the system resolver (no DNS server can be pointed at here): answers what
    the test sets and counts lookups."""

    def __init__(self, answer: str) -> None:
        self.answer, self.lookups = answer, 0

    def __call__(self, host, port, type=0):  # noqa: A002 (getaddrinfo's signature)
        self.lookups += 1
        if self.answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.answer, port))]


def _fetcher(resolver: Resolver, ttl: float) -> Fetcher:
    return Fetcher(CrawlConfig(dns_cache_ttl_s=ttl), getaddrinfo=resolver)


def test_answers_are_cached_for_their_ttl():
    resolver = Resolver("93.184.216.34")
    fetcher = _fetcher(resolver, ttl=60)
    assert [fetcher.resolve("example.org", 80) for _ in range(5)] == ["93.184.216.34"] * 5
    assert resolver.lookups == 1
    assert fetcher.resolve("example.org", 443) == "93.184.216.34" and resolver.lookups == 2


def test_rebinding_to_a_private_address_is_refused_once_the_entry_expires():
    resolver = Resolver("93.184.216.34")
    fetcher = _fetcher(resolver, ttl=0.2)
    assert fetcher.resolve("rebind.example", 80) == "93.184.216.34"
    resolver.answer = "10.0.0.7"  # the attacker's DNS now points the name inside the network
    # Within the TTL the connection still goes to the address that was checked ...
    assert fetcher.resolve("rebind.example", 80) == "93.184.216.34"
    time.sleep(0.3)
    # ... and after it the new answer is checked again and refused, as on every request.
    for _ in range(2):
        with pytest.raises(FetchError) as err:
            fetcher.resolve("rebind.example", 80)
        assert err.value.kind == "blocked_address" and "10.0.0.7" in str(err.value)
    resolver.answer = "169.254.169.254"  # cloud metadata
    time.sleep(0.3)
    with pytest.raises(FetchError, match="169.254.169.254"):
        fetcher.resolve("rebind.example", 80)
    assert resolver.lookups == 3


def test_a_private_first_answer_is_refused_and_failures_are_cached():
    resolver = Resolver("192.168.1.1")
    fetcher = _fetcher(resolver, ttl=60)
    with pytest.raises(FetchError, match="non-public"):
        fetcher.resolve("router.example", 80)
    resolver.answer = None
    with pytest.raises(FetchError) as err:
        fetcher.resolve("gone.example", 80)
    assert err.value.kind == "dns_error"
    with pytest.raises(FetchError):
        fetcher.resolve("gone.example", 80)
    assert resolver.lookups == 2  # the failed name was not looked up again


def test_a_slow_url_does_not_hold_back_the_rest_of_the_shard(
    image_server, crawl_cfg, tmp_path, monkeypatch
):
    """Rows are written as they finish: the slow row (2 s) at the head of the shard reaches the
    tar sink last. The committed tar is in row order all the same, as the manifest is, so a
    crawl of the same input gives the same tar whatever the network's timing."""
    from pipeline.stages import crawl as crawl_stage

    added: list[str] = []

    class RecordingSink(crawl_stage.TarSink):  # the real sink, noting the order rows reach it
        def add(self, key, jpeg, meta):
            added.append(key)
            super().add(key, jpeg, meta)

    monkeypatch.setattr(crawl_stage, "TarSink", RecordingSink)
    crawl_cfg.read_timeout_s = crawl_cfg.total_timeout_s = 5.0
    crawl_cfg.threads_per_task = 4
    urls = [image_server.url("fault/slow")] + [
        image_server.url(f"img/{i:06d}.jpg") for i in range(12)
    ]
    crawl_shard(pa.table({"url": urls}), 0, tmp_path, crawl_cfg)
    rows = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert [r["url"] for r in rows] == urls
    assert [r["key"] for r in rows] == [f"00000{i:04d}" for i in range(len(urls))]
    assert all(r["status"] == "success" for r in rows)
    assert added[-1] == rows[0]["key"] and sorted(added) == [r["key"] for r in rows]
    tar = tmp_path / "00000.tar"
    assert [key for key, _ in iter_tar_samples(tar)] == [r["key"] for r in rows]
    with tarfile.open(tar) as archive:  # a well-formed archive, each sample's pair adjacent
        names = archive.getnames()
    assert names == [f"{r['key']}.{ext}" for r in rows for ext in ("jpg", "json")]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("copy", ["kernel", "short_kernel_copies", "no_kernel_copy", "fails"])
def test_a_key_ordered_sink_writes_the_tar_an_in_order_one_writes(tmp_path, monkeypatch, copy):
    """Samples added out of key order commit byte for byte as the same samples added in order:
    with the kernel's copy, with the short copies it may make, through a buffer (a filesystem
    without it); an I/O error during the copy leaves no tar and no temporary."""
    import errno
    import os

    from pipeline import shardio

    kernel_copy = os.copy_file_range
    copied = []

    def spy(src, dst, count, offset_src=None):
        if copy == "no_kernel_copy":
            raise OSError(errno.EXDEV, "no copy_file_range across these files")
        if copy == "fails" and copied:
            raise OSError(errno.EIO, "disk error")
        n = kernel_copy(src, dst, min(count, 1000) if copy == "short_kernel_copies" else count,
                        offset_src)  # fmt: skip
        copied.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", spy)
    samples = [(f"{i:04d}", bytes([i]) * (100 + 517 * i), {"i": i}) for i in range(9)]
    shuffled = [samples[i] for i in (4, 0, 8, 2, 7, 1, 6, 3, 5)]
    in_order = shardio.TarSink(tmp_path / "a.tar")
    for sample in samples:
        in_order.add(*sample)
    in_order.commit()
    reference = (tmp_path / "a.tar").read_bytes()
    sorted_sink = shardio.TarSink(tmp_path / "b.tar", key_order=True)
    for sample in shuffled:
        sorted_sink.add(*sample)
    if copy == "fails":
        with pytest.raises(OSError, match="disk error"):
            sorted_sink.commit()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar"]
        return
    sorted_sink.commit()
    assert (tmp_path / "b.tar").read_bytes() == reference
    assert [k for k, _ in iter_tar_samples(tmp_path / "b.tar")] == [s[0] for s in samples]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]  # no temporaries
    with tarfile.open(tmp_path / "a.tar") as archive:  # the samples' bytes: up to the end blocks
        last = archive.getmembers()[-1]
    members_end = last.offset_data + -(-last.size // 512) * 512
    assert sum(copied) == (0 if copy == "no_kernel_copy" else members_end)
    assert copy != "short_kernel_copies" or max(copied) == 1000


def test_a_key_the_tar_cannot_name_leaves_nothing_of_its_sample(tmp_path):
    from pipeline import shardio

    sink = shardio.TarSink(tmp_path / "x.tar")
    sink.add("a", b"jpeg-a", {"n": 1})
    with pytest.raises(ValueError):
        sink.add("k" * 96, b"jpeg-k", {"n": 2})  # "k...k.jpg" fits USTAR, "k...k.json" does not
    sink.add("b", b"jpeg-b", {"n": 3})
    sink.commit()
    with tarfile.open(tmp_path / "x.tar") as archive:
        assert archive.getnames() == ["a.jpg", "a.json", "b.jpg", "b.json"]


def test_every_writer_is_atomic_and_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    import os

    import numpy as np

    from pipeline import shardio

    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    table = pa.table({"a": [1, 2]})
    shardio.write_parquet_atomic(table, tmp_path / "t.parquet")
    shardio.write_npy_atomic(np.arange(3), tmp_path / "a.npy")
    shardio.write_stats({"n": 1}, tmp_path / "s.json")
    sink = shardio.TarSink(tmp_path / "x.tar")
    sink.add("k", b"jpeg", {"n": 1})
    sink.commit()
    # Each of the four writers fsyncs its file and then the directory holding it.
    assert len(synced) == 8
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2]
    assert dict(iter_tar_samples(tmp_path / "x.tar"))["k"]["jpg"] == b"jpeg"

    with pytest.raises(pa.ArrowInvalid):
        shardio.write_parquet_atomic(pa.table({"a": [1]}), tmp_path / "bad.parquet")
        raise pa.ArrowInvalid("a writer failing halfway")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError):
        with shardio.AtomicFile(tmp_path / "half.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half.bin, no temporary
    assert not list(tmp_path.glob(".*.tmp"))


def _client_sockets(server_port: int) -> set[str]:
    """This process's TCP sockets connected to ``server_port`` (the in-process server's own
    ends of the same connections are left out), by inode."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor, closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    connected = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        remote_port, state, inode = int(fields[2].split(":")[1], 16), fields[3], fields[9]
        if remote_port == server_port and state == "01" and inode in inodes:  # 01: ESTABLISHED
            connected.add(inode)
    return connected


def test_keep_alive_reuses_one_connection_and_idle_ones_are_bounded(image_server, crawl_cfg):
    """One host: serial requests share one connection. Many hosts (names resolving to the same
    server): the fetcher keeps at most ``threads_per_task`` idle connections open in all, not
    one per host it has seen (a shard over thousands of hosts would run out of descriptors)."""
    crawl_cfg.threads_per_task = 2
    port = int(image_server.url("x").split(":")[2].split("/")[0])
    before = _client_sockets(port)
    fetcher = Fetcher(crawl_cfg)
    seen = []
    for i in range(5):
        assert fetcher.fetch(image_server.url(f"img/{i:06d}.jpg")).http_status == 200
        seen.append(_client_sockets(port) - before)
    assert len(seen[0]) == 1 and all(s == seen[0] for s in seen)
    fetcher.close()
    assert not _client_sockets(port) - before

    fetcher = Fetcher(crawl_cfg, getaddrinfo=Resolver("127.0.0.1"))
    open_counts = []
    for i in range(6):
        result = fetcher.fetch(f"http://host{i}.test:{port}/img/{i:06d}.jpg")
        assert result.http_status == 200 and result.data
        open_counts.append(len(_client_sockets(port) - before))
    assert open_counts == [1, 2, 2, 2, 2, 2]
    fetcher.close()
    assert not _client_sockets(port) - before


def test_short_error_bodies_keep_the_connection_and_an_endless_one_is_cut_off(
    image_server, crawl_cfg
):
    """A 404 or a redirect read to its end leaves its connection for the next URL of the host;
    an error body that drips forever is abandoned within a read timeout, its connection closed
    (reading it to the end would hold the thread, and the shard, forever)."""
    port = int(image_server.url("x").split(":")[2].split("/")[0])
    before = _client_sockets(port)
    fetcher = Fetcher(crawl_cfg)
    assert fetcher.fetch(image_server.url("img/000000.jpg")).http_status == 200
    first = _client_sockets(port) - before
    assert len(first) == 1
    for path, status in (("fault/404", 404), ("fault/redirect", 200), ("img/000001.jpg", 200)):
        try:
            assert fetcher.fetch(image_server.url(path)).http_status == status
        except FetchError as exc:
            assert (exc.kind, exc.http_status) == ("http_error", status)
        assert _client_sockets(port) - before == first, path  # still the one connection
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(image_server.url("fault/404-drip"))
    assert (caught.value.kind, caught.value.http_status) == ("http_error", 404)
    assert time.monotonic() - started < crawl_cfg.read_timeout_s + 2
    assert not _client_sockets(port) - before  # closed, not kept half-read
    fetcher.close()


def test_https_certificates_are_verified(tmp_path, crawl_cfg):
    """A TLS server whose certificate no authority signed is refused, whatever its bytes."""
    import http.server
    import ssl
    import subprocess
    import threading

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        crawl_cfg.retries = 0
        fetcher = Fetcher(crawl_cfg, getaddrinfo=Resolver("127.0.0.1"))
        with pytest.raises(FetchError) as err:
            fetcher.fetch(f"https://localhost:{server.server_address[1]}/")
        assert err.value.kind == "connection_error"
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    finally:
        server.shutdown()
        server.server_close()
