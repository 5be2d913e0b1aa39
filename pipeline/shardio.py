"""Atomic writers and readers of shard files: tars, parquet, npy, stats JSON.

Everything is written under a temporary name and renamed into place; a stage writes its done
marker last, so the marker's presence means the files beside it are complete and consistent.
Where the files live is `pipeline.layout`'s business.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import CRAWL_SCHEMA, temp_name

MANIFEST_SCHEMA = CRAWL_SCHEMA
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


class AtomicFile:
    """A file written under a writer-unique temporary name beside ``path``; ``commit`` fsyncs
    it, renames it into place and fsyncs the directory, so after a crash or power loss the
    file is either absent or whole (and a done marker, committed last, never outlives the
    files it vouches for). ``abort`` removes the temporary. Every pipeline writer uses this.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.path)

    def commit(self) -> None:
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class TarSink:
    """Appends KEY.jpg + KEY.json members to a temporary tar; ``commit`` renames it into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = AtomicFile(path)
        self._tar = tarfile.open(self._file.tmp, "w", format=tarfile.USTAR_FORMAT)

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
        self._file.commit()

    def abort(self) -> None:
        self._tar.close()
        self._file.abort()


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    with AtomicFile(path) as tmp:
        pq.write_table(table, tmp)


def write_npy_atomic(array: np.ndarray, path: Path) -> None:
    with AtomicFile(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_text_atomic(text: str, path: Path) -> None:
    with AtomicFile(path) as tmp:
        Path(tmp).write_text(text)


def write_stats(stats: dict, path: Path) -> None:
    write_text_atomic(json.dumps(stats, indent=2, sort_keys=True, default=str) + "\n", path)


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
