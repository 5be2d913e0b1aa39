"""Shard files: RUN/crawl/NNNNN.{tar,parquet,stats.json}, written atomically.

The tar and parquet are written under temporary names and renamed into place; the stats file
is written last, so its presence means the shard is complete and consistent.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.configtools import atomic_write_text

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("http_status", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("phash", pa.uint64()),
        ("jpg_sha256", pa.string()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


def shard_name(index: int) -> str:
    return f"{index:05d}"


def shard_paths(crawl_dir: Path, index: int) -> dict[str, Path]:
    name = shard_name(index)
    return {
        "tar": crawl_dir / f"{name}.tar",
        "parquet": crawl_dir / f"{name}.parquet",
        "stats": crawl_dir / f"{name}.stats.json",
    }


def is_done(crawl_dir: Path, index: int) -> bool:
    return shard_paths(crawl_dir, index)["stats"].exists()


def done_shards(crawl_dir: Path) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in crawl_dir.glob("*.stats.json"))


class TarSink:
    """Appends KEY.jpg + KEY.json members to a temporary tar; ``commit`` renames it into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = _temp_name(path)
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, jpeg: bytes, meta: dict) -> None:
        self._member(f"{key}.jpg", jpeg)
        self._member(f"{key}.json", json.dumps(meta, default=str, sort_keys=True).encode())

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # reproducible tars
        self._tar.addfile(info, io.BytesIO(data))

    def commit(self) -> None:
        self._tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = _temp_name(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _temp_name(path: Path) -> Path:
    # Unique per writer: a stray task of a killed driver can never share a temp file with a
    # task of the rerun.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def write_stats(stats: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(stats, indent=2, sort_keys=True) + "\n")


def read_stats(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order; members of one key are adjacent."""
    with tarfile.open(path, "r") as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.partition(".")
            if key is not None and stem != key:
                yield key, files
                files = {}
            key = stem
            files[ext] = tar.extractfile(member).read()
        if key is not None:
            yield key, files


def clear_temporaries(crawl_dir: Path) -> None:
    """Remove half-written files a killed run left behind."""
    for tmp in crawl_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
