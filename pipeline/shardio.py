"""Atomic writers and readers of shard files: tars, parquet, npy, stats JSON.

Everything is written under a temporary name and renamed into place; a stage writes its done
marker last, so the marker's presence means the files beside it are complete and consistent.
Where the files live is `pipeline.layout`'s business.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import CRAWL_SCHEMA
from pretrain.configtools import AtomicFile, atomic_write_text
from pretrain.data.tars import tar_samples

MANIFEST_SCHEMA = CRAWL_SCHEMA
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 20 blocks: tarfile pads the archive's end to a whole record


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file (mode 0644, owner 0, mtime 0): byte for byte
    what ``tarfile`` writes for the same member, built without its per-member Python objects
    (``TarInfo``, a copy of it, field-by-field encoding: most of a crawl task's tar cost)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or not raw.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    fields = (raw, b"\x00" * (100 - len(raw)), size, 0)  # name, its padding, size, mtime
    head = b"%s%s0000644\x000000000\x000000000\x00%011o\x00%011o\x00" % fields
    # type "0", no link name, the magic, then empty owner names, device numbers and prefix
    tail = b"0" + b"\x00" * 100 + b"ustar\x0000" + b"\x00" * (_BLOCK - 156 - 109)
    # The checksum is the sum of the header's bytes with its own 8-byte field read as spaces.
    checksum = sum(head) + sum(tail) + 8 * 32
    return head + b"%06o\x00 " % checksum + tail


class TarSink:
    """Appends KEY.jpg + KEY.json members to a temporary tar; ``commit`` renames it into place.

    The archive is USTAR, as ``tarfile`` would write it (tested byte for byte), written directly.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = AtomicFile(path)
        self._out = open(self._file.tmp, "wb", buffering=1 << 20)  # noqa: SIM115 (commit / abort close it)
        self._offset = 0

    def add(self, key: str, jpeg: bytes, meta: dict) -> None:
        self._member(f"{key}.jpg", jpeg)
        self._member(f"{key}.json", json.dumps(meta, default=str, sort_keys=True).encode())

    def _member(self, name: str, data: bytes) -> None:
        pad = -len(data) % _BLOCK
        self._out.write(ustar_header(name, len(data)))
        self._out.write(data)
        if pad:
            self._out.write(b"\x00" * pad)
        self._offset += _BLOCK + len(data) + pad

    def commit(self) -> None:
        end = self._offset + 2 * _BLOCK  # two zero blocks close the archive ...
        self._out.write(b"\x00" * (2 * _BLOCK + -end % _RECORD))  # ... padded to a record
        self._out.close()
        self._file.commit()

    def abort(self) -> None:
        self._out.close()
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
    """(key, {extension: bytes}) per sample, in tar order; members of one key are adjacent.

    The bounded reader of `pretrain.data.tars` (a plain file, an uncompressed tar stream, huge
    members skipped): crawl tars are ours, but evaluation and seed sets come from elsewhere."""
    for sample in tar_samples(str(path)):
        yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def write_train_shard_list(layout, tars: list[Path]) -> None:
    """RUN/train_shards.txt (``layout`` a ``RunLayout``): what `pretrain.train data.shards=RUN`
    reads, one tar path per line relative to the run directory."""
    lines = [str(Path(t).relative_to(layout.root)) for t in tars]
    atomic_write_text(layout.train_shard_list, "".join(f"{line}\n" for line in lines))
