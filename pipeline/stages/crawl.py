"""The crawl stage over one shard: fetch, verify, resize, hash, write tar + parquet + stats.

Plain functions, no Ray: ``crawl_shard_steps`` is what one Ray (generator) task runs, reporting
its tail before its stats; ``crawl_shard`` runs it to the end, for tests and the seed set.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import CrawlConfig
from pipeline.fetch import Fetcher, FetchError
from pipeline.imaging import ImageError, process_image
from pipeline.layout import CrawlShard, crawl_shard_files, shard_name
from pipeline.shardio import (
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    TarSink,
    iter_tar_samples,
    tar_member_index,
    write_parquet_atomic,
    write_stats,
)
from pipeline.sources import input_digest, local_loader

log = logging.getLogger(__name__)

Loader = Callable[[dict], tuple[bytes, int | None]]  # row -> (bytes, http_status)


def sample_key(shard_index: int, row_index: int, key_width: int) -> str:
    return f"{shard_name(shard_index)}{row_index:0{key_width}d}"


def key_width_for(shard_size: int) -> int:
    return max(4, len(str(shard_size - 1)))


def crawl_row(
    row: dict, load: Loader, cfg: CrawlConfig, cpu_slots: threading.Semaphore
) -> tuple[dict, bytes | None]:
    """One input row -> (manifest fields, JPEG bytes or None); never raises for bad input.

    The work after the download (hash, decode, resize, encode) waits for one of ``cpu_slots``:
    a task's many network threads share a few CPU slots.
    """
    record = {name: None for name in MANIFEST_COLUMNS}
    record["url"] = row.get("url")
    try:
        if not isinstance(row.get("url"), str) or not row["url"].strip():
            raise FetchError("bad_url", f"missing or non-string URL: {row.get('url')!r}")
        data, record["http_status"] = load(row)
        with cpu_slots:
            record["sha256"] = hashlib.sha256(data).hexdigest() if data else None
            image = process_image(data, cfg)
            jpg_sha256 = hashlib.sha256(image.jpeg).hexdigest()
    except (FetchError, ImageError) as exc:
        record.update(status="failed", error_type=exc.kind, error_message=str(exc))
        record["http_status"] = getattr(exc, "http_status", None) or record["http_status"]
        return record, None
    except Exception as exc:  # a bug or an odd input must not stop the shard
        log.exception("unexpected error on %s", row.get("url"))
        record.update(status="failed", error_type="internal_error", error_message=repr(exc))
        return record, None
    record.update(
        status="success",
        width=image.width,
        height=image.height,
        original_width=image.original_width,
        original_height=image.original_height,
        bytes=len(data),
        phash=image.phash,
        jpg_sha256=jpg_sha256,
    )
    return record, image.jpeg


TAIL = {"tail": True}  # what crawl_shard_steps yields once every row is in a thread's hands


def crawl_shard(
    table: pa.Table, shard_index: int, crawl_dir: Path, cfg: CrawlConfig, kind: str = "urls"
) -> dict:
    """Crawl one input shard (columns: ``url`` + carried extras); return its stats.

    With ``cfg.retry_failed`` and a finished shard on disk, successful rows are copied from the
    old tar and only the failed rows are fetched again.
    """
    *_, stats = crawl_shard_steps(table, shard_index, crawl_dir, cfg, kind)
    return stats


def crawl_shard_steps(
    table: pa.Table, shard_index: int, crawl_dir: Path, cfg: CrawlConfig, kind: str = "urls"
) -> Iterator[dict]:
    """``crawl_shard`` as steps: yields ``TAIL`` once the last row has been handed to a thread
    (from then on the task only waits for the rows still in flight, often one slow server, and
    its CPU is mostly idle), then the shard's stats, once its files are in place."""
    started = time.time()
    crawl_dir.mkdir(parents=True, exist_ok=True)
    paths = crawl_shard_files(crawl_dir, shard_index)
    width = key_width_for(cfg.shard_size)
    previous = _previous_results(paths, table) if paths.stats.exists() else {}
    rows = table.to_pylist()
    fetcher = Fetcher(cfg) if kind == "urls" else None
    load = _url_loader(fetcher) if fetcher else local_loader(kind, cfg.max_bytes)
    paths.stats.unlink(missing_ok=True)  # not done until rewritten below
    sink = TarSink(paths.tar, key_order=True)
    records: list[dict | None] = [None] * len(rows)
    try:
        with ThreadPoolExecutor(cfg.threads_per_task) as pool:
            results = _completed_results(pool, rows, load, cfg, previous, shard_index, width)
            for result in results:
                if result is TAIL:
                    yield TAIL
                    continue
                row_index, key, record, jpeg, meta = result
                record["key"] = key
                records[row_index] = record
                if jpeg is not None:
                    sink.add(key, jpeg, meta or _sample_meta(record, rows[row_index]))
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        if fetcher:
            fetcher.close()
    write_parquet_atomic(_manifest_table(records, table), paths.parquet)
    stats = {
        **_stats(records, shard_index, started),
        "input_urls_sha256": input_digest(table),
        "tar_bytes": paths.tar.stat().st_size,  # retry_failed: a tar of another size is checked
    }
    write_stats(stats, paths.stats)
    yield stats


def _url_loader(fetcher: Fetcher) -> Loader:
    def load(row: dict) -> tuple[bytes, int | None]:
        result = fetcher.fetch(row["url"])
        return result.data, result.http_status

    return load


def _completed_results(pool, rows, load, cfg, previous, shard_index, width) -> Iterator[tuple]:
    """(row index, key, record, jpeg, meta) as each row finishes, in completion order, with
    ``TAIL`` between them once the last row has been submitted.

    A bounded number of rows is in flight, so memory stays flat; nothing waits on the slowest
    row (a server that takes the whole timeout, a retry's backoff), which a row-ordered window
    would: there every thread idles once the window fills behind one slow URL. Rows reach the
    tar sink in completion order and it commits them in key (= row) order; the manifest, built
    from these by row index, is in row order too. Each
    finished row is queued by its future's callback: taking one costs O(1), where
    ``concurrent.futures.wait`` scanned (and hooked a waiter onto) every row in flight.
    """
    finished: queue.SimpleQueue = queue.SimpleQueue()
    in_flight, limit = 0, cfg.threads_per_task * 2
    cpu_slots = threading.Semaphore(cfg.cpu_slots_per_task)
    for row_index, row in enumerate(rows):
        key = sample_key(shard_index, row_index, width)
        old = previous.get(key)
        if old is not None:
            record, jpeg, meta = old
            yield row_index, key, dict(record), jpeg, meta
            continue
        future = pool.submit(crawl_row, row, load, cfg, cpu_slots)
        future.add_done_callback(partial(_queue_row, finished, row_index, key))
        in_flight += 1
        if in_flight >= limit:
            yield _take(finished)
            in_flight -= 1
    yield TAIL
    for _ in range(in_flight):
        yield _take(finished)


def _queue_row(finished: queue.SimpleQueue, row_index: int, key: str, future: Future) -> None:
    finished.put((row_index, key, future))


def _take(finished: queue.SimpleQueue) -> tuple:
    row_index, key, future = finished.get()
    record, jpeg = future.result()
    return row_index, key, record, jpeg, None


def to_retry(paths: CrawlShard, stats: dict) -> bool:
    """retry_failed: a finished shard is crawled again for its failures, or for successes its
    tar no longer holds (those are fetched again, the rest copied from the old tar). A tar of
    the size its stats recorded at commit is taken as it was, with one ``stat``; the member
    check of `lost_samples` is for the others, and for shards crawled before the size was
    recorded."""
    if stats["failures"] > 0:
        return True
    try:
        if paths.tar.stat().st_size == stats.get("tar_bytes"):
            return False
    except FileNotFoundError:  # the tar is gone: lost_samples counts every success
        log.warning("%s: missing", paths.tar)
    lost = lost_samples(paths)
    if lost:
        log.warning("%s: %d successes missing from the tar; fetching them again", paths.tar, lost)
    return lost > 0


def lost_samples(paths: CrawlShard) -> int:
    """How many successes of a finished shard its tar no longer holds whole (its ``jpg`` and
    ``json`` members, each ending inside the file): a member gone, the tar cut short or
    unreadable (a disk error, a hand edit, a copy that stopped). Read from the tar's headers and
    the manifest's key and status columns only. ``retry_failed`` reopens a shard with any, as
    it does one with failures; an unreadable manifest counts as one."""
    try:
        rows = pq.read_table(paths.parquet, columns=["key", "status"]).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s: unreadable (%s)", paths.parquet, exc)
        return 1
    wanted = [r["key"] for r in rows if r["status"] == "success"]
    try:
        index, size = tar_member_index(paths.tar), paths.tar.stat().st_size
    except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
        log.warning("%s: unreadable (%s)", paths.tar, exc)
        return len(wanted) or 1
    whole = {
        key
        for key, files in index.items()
        if {"jpg", "json"} <= files.keys() and all(o + n <= size for o, n in files.values())
    }
    return sum(key not in whole for key in wanted)


def _previous_results(
    paths: CrawlShard, table: pa.Table
) -> dict[str, tuple[dict, bytes, dict | None]]:
    """Key -> (manifest record, jpeg, sample meta) of a finished shard's successes, for
    retry_failed. Only what can be reused: nothing if the shard was crawled from other URLs (a
    key is a row index), and no success whose image the tar no longer holds (a member gone, a
    tar cut short: those rows are fetched again)."""
    crawled_from = json.loads(paths.stats.read_text()).get("input_urls_sha256")
    if crawled_from not in (None, input_digest(table)):  # None: a shard of before it was kept
        log.warning("%s: crawled from other URLs; nothing of it is reused", paths.stats)
        return {}
    try:
        records = pq.read_table(paths.parquet, columns=list(MANIFEST_COLUMNS)).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s: unreadable (%s); the whole shard is fetched again", paths.parquet, exc)
        return {}
    samples: dict[str, dict[str, bytes]] = {}
    try:
        for key, files in iter_tar_samples(paths.tar):
            samples[key] = files
    except (EOFError, tarfile.TarError) as exc:
        log.warning("%s: unreadable after %d samples (%s); the rest is fetched again",
                    paths.tar, len(samples), exc)  # fmt: skip
    out = {}
    for record in records:
        files = samples.get(record["key"], {})
        if record["status"] != "success" or "jpg" not in files:
            continue
        try:
            meta = json.loads(files["json"]) if "json" in files else None
        except ValueError:
            meta = None  # rebuilt from the record and the input row
        out[record["key"]] = (record, files["jpg"], meta)
    return out


def _sample_meta(record: dict, row: dict) -> dict:
    meta = {k: v for k, v in row.items() if k != "url"}
    meta.update(
        {k: record[k] for k in MANIFEST_COLUMNS if k not in ("error_type", "error_message")}
    )
    meta["phash"] = f"{record['phash']:016x}"
    return meta


def _manifest_table(records: list[dict], source: pa.Table) -> pa.Table:
    table = pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA)
    for name in source.column_names:
        if name not in MANIFEST_SCHEMA.names:
            table = table.append_column(name, source.column(name))
    return table


def _stats(records: list[dict], shard_index: int, started: float) -> dict:
    by_status = collections.Counter(r["status"] for r in records)
    by_error = collections.Counter(r["error_type"] for r in records if r["status"] != "success")
    return {
        "shard": shard_index,
        "count": len(records),
        "successes": by_status.get("success", 0),
        "failures": len(records) - by_status.get("success", 0),
        "status": dict(by_status),
        "errors": dict(by_error),
        "bytes_downloaded": sum(r["bytes"] or 0 for r in records),
        "started_at": started,
        "duration_s": round(time.time() - started, 3),
    }
