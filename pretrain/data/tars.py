"""Samples of a local WebDataset tar, read with bounds: shards are files from elsewhere.

WebDataset's own reader opens any path through `gopen` (a file named `pipe:cmd;.tar`, matched by
a glob, would run `cmd`), opens the stream with `r|*` (a gzip, bzip2 or xz stream behind a
`.tar` name is decompressed without bound) and reads every member whole, whatever size it
declares. Here a shard is a plain file, only an uncompressed tar stream is read (anything else
is a `tarfile.ReadError`, which the loader counts as a corrupt tar), and a member larger than
`max_member_bytes` is skipped unread (its sample then lacks that field and is counted as a
corrupt sample if it was the image). Samples follow WebDataset's convention: consecutive
members whose paths agree up to the first dot of the file name form one sample, keyed by that
prefix, each field named by the lowercased rest.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator

MAX_MEMBER_BYTES = 64 * 2**20  # far above any training image (the crawl keeps <= 20 MB)


class FileTooLarge(ValueError):
    """A file larger than the reader's cap (``size`` bytes, at least)."""

    def __init__(self, path: str, size: int, cap: int) -> None:
        super().__init__(f"{path}: {size} bytes > the cap of {cap}")
        self.size = size


def open_regular(path: str | os.PathLike):
    """A binary file object of ``path`` if it is a regular file; ValueError otherwise. Opened
    without blocking (a FIFO named x.jpg or x.tar would hang a plain ``open``), then checked
    (a symlink to /dev/zero would read forever). OSError if it cannot be opened."""
    f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ValueError(f"{path} is not a regular file")
    return f


def read_regular_file(path: str | os.PathLike, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
    """The bytes of a regular file (see ``open_regular``) of at most ``max_bytes``; image
    folders are files from elsewhere. Read with a bound: a file may grow after its size was
    checked. OSError if it cannot be read."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FileTooLarge(str(path), size, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(str(path), len(data), max_bytes)
    return data


def tar_samples(path: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """{"__key__", "__url__", field: bytes, ...} per sample, in tar order."""
    with open_regular(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        sample: dict | None = None
        for member in tar:
            if not member.isfile():
                continue
            folder, name = os.path.split(member.name)
            stem, dot, field = name.partition(".")
            if not dot or not stem or name.startswith("__"):
                continue  # no field name, or WebDataset's own metadata members
            key = os.path.join(folder, stem)
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": path}
            if member.size > max_member_bytes:
                continue  # the stream skips its data unread
            handle = tar.extractfile(member)
            if handle is not None:
                sample[field.lower()] = handle.read()
        if sample is not None:
            yield sample
