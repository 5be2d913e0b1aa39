"""Atomic writers and readers of shard files: tars, parquet, npy, stats JSON.

Everything is written under a temporary name and renamed into place; a stage writes its done
marker last, so the marker's presence means the files beside it are complete and consistent.
Where the files live is `pipeline.layout`'s business.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import CRAWL_SCHEMA
from pretrain.configtools import AtomicFile, atomic_write_text

MANIFEST_SCHEMA = CRAWL_SCHEMA
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


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


def write_stats(stats: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(stats, indent=2, sort_keys=True, default=str) + "\n")


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


def write_train_shard_list(layout, tars: list[Path]) -> None:
    """RUN/train_shards.txt (``layout`` a ``RunLayout``): what `pretrain.train data.shards=RUN`
    reads, one tar path per line relative to the run directory."""
    lines = [str(Path(t).relative_to(layout.root)) for t in tars]
    atomic_write_text(layout.train_shard_list, "".join(f"{line}\n" for line in lines))
