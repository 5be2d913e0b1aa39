"""Atomic writers and readers of shard files: tars, parquet, npy, stats JSON.

Everything is written under a temporary name and renamed into place; a stage writes its done
marker last, so the marker's presence means the files beside it are complete and consistent.
Where the files live is `pipeline.layout`'s business.
"""

from __future__ import annotations

import errno
import json
import os
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
    With ``key_order``, samples may be added in any order (a crawl adds them as their fetches
    finish) and the committed tar holds them sorted by key: ``commit`` copies each sample's
    bytes (header and data, already laid out) into a second temporary file in key order, a copy
    the kernel does (``copy_file_range``) without the bytes passing through Python. So the same
    input gives the same tar, whatever the network's timing.
    """

    def __init__(self, path: Path, key_order: bool = False) -> None:
        self.path = path
        self._file = AtomicFile(path)
        self._out = open(self._file.tmp, "wb", buffering=1 << 20)  # noqa: SIM115 (commit / abort close it)
        self._offset = 0
        self._spans: list[tuple[str, int, int]] | None = [] if key_order else None

    def add(self, key: str, jpeg: bytes, meta: dict) -> None:
        """Both headers are built before either member is written: a name USTAR cannot hold
        raises ``ValueError`` with nothing of the sample in the tar."""
        text = json.dumps(meta, default=str, sort_keys=True).encode()
        members = [(ustar_header(f"{key}.{ext}", len(data)), data)
                   for ext, data in (("jpg", jpeg), ("json", text))]  # fmt: skip
        start = self._offset
        for header, data in members:
            self._member(header, data)
        if self._spans is not None:
            self._spans.append((key, start, self._offset - start))

    def _member(self, header: bytes, data: bytes) -> None:
        pad = -len(data) % _BLOCK
        self._out.write(header)
        self._out.write(data)
        if pad:
            self._out.write(b"\x00" * pad)
        self._offset += _BLOCK + len(data) + pad

    def _end(self) -> bytes:
        end = self._offset + 2 * _BLOCK  # two zero blocks close the archive ...
        return b"\x00" * (2 * _BLOCK + -end % _RECORD)  # ... padded to a record

    def commit(self) -> None:
        spans = self._spans
        if spans is None or all(a[0] <= b[0] for a, b in zip(spans, spans[1:])):
            self._out.write(self._end())
            self._out.close()
            self._file.commit()
            return
        self._out.close()
        ordered = AtomicFile(self.path)
        try:
            with open(self._file.tmp, "rb") as src, open(ordered.tmp, "wb", buffering=0) as dst:
                for _, start, length in sorted(spans):
                    _copy_range(src.fileno(), dst.fileno(), start, length)
                _write_all(dst.fileno(), self._end())
            ordered.commit()
        except BaseException:
            ordered.abort()
            raise
        finally:
            self._file.abort()

    def abort(self) -> None:
        self._out.close()
        self._file.abort()


def _copy_range(src: int, dst: int, start: int, length: int) -> None:
    """Append ``length`` bytes of ``src`` from ``start`` at ``dst``'s position, in the kernel
    where it can (``copy_file_range``), else through a buffer."""
    copy = getattr(os, "copy_file_range", None)  # Linux only
    done = 0
    while done < length:
        n = 0
        if copy is not None:
            try:
                n = copy(src, dst, length - done, start + done)
            except OSError as exc:  # not on this kernel or filesystem
                if exc.errno not in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                copy = None
        if n == 0:  # not supported, or the source ended early: copy through a buffer
            chunk = os.pread(src, min(length - done, 1 << 20), start + done)
            if not chunk:
                raise OSError(errno.EIO, f"tar ended at {start + done} of {start + length}")
            _write_all(dst, chunk)
            n = len(chunk)
        done += n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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


MemberIndex = dict[str, dict[str, tuple[int, int]]]


def tar_member_index(tar_path: Path) -> MemberIndex:
    """key -> {extension: (data offset, size)} of a tar, from its headers only (tarfile seeks
    over the data of an uncompressed tar), so a writer can seek + read one member."""
    index: MemberIndex = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            files = index.setdefault(key, {})
            if ext in files:
                raise ValueError(f"{tar_path}: member {member.name} appears twice")
            files[ext] = (member.offset_data, member.size)
    return index


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
