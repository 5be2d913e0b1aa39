"""Input sources, cut into shards of ``shard_size`` rows, read lazily.

URL lists: parquet, csv, jsonl or txt (one URL a line); the URL column becomes ``url`` and every
other column is carried along. Local sources: a folder of image files, or WebDataset tars
(each image becomes a row pointing at its bytes inside the tar).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import INPUT_KINDS, InputConfig
from pipeline.fetch import FetchError
from pipeline.layout import is_reserved_field
from pretrain.data.tars import FileTooLarge, open_regular, read_regular_file

URL_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".txt": "txt"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class InputError(ValueError):
    """An input that cannot be crawled: missing, malformed, empty, or without the URL column."""


def check_input(cfg: InputConfig) -> int:
    """Validate the input completely before any work; return its number of rows."""
    if cfg.kind not in INPUT_KINDS:
        raise InputError(f"input.kind must be one of {INPUT_KINDS}, got {cfg.kind!r}")
    rows = sum(batch.num_rows for batch in _batches(cfg, check_only=True))
    if rows == 0:
        raise InputError(f"input {_describe(cfg)} holds no rows")
    return rows


def iter_shards(cfg: InputConfig, shard_size: int) -> Iterator[tuple[int, pa.Table]]:
    """(shard index, table of at most shard_size rows) in order, holding one shard in memory."""
    pending: list[pa.RecordBatch] = []
    pending_rows, index = 0, 0
    for batch in _batches(cfg):
        while batch.num_rows:
            take = min(shard_size - pending_rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == shard_size:
                yield index, pa.Table.from_batches(pending).combine_chunks()
                pending, pending_rows, index = [], 0, index + 1
    if pending_rows:
        yield index, pa.Table.from_batches(pending).combine_chunks()


def _describe(cfg: InputConfig) -> str:
    return {"urls": cfg.urls, "folder": cfg.folder, "tars": cfg.tars}.get(cfg.kind, "?")


def _batches(cfg: InputConfig, check_only: bool = False) -> Iterator[pa.RecordBatch]:
    if cfg.kind == "folder":
        yield from _folder_batches(cfg.folder)
    elif cfg.kind == "tars":
        yield from _tar_batches(cfg.tars)
    else:
        yield from _url_batches(cfg, check_only)


def _url_batches(cfg: InputConfig, check_only: bool) -> Iterator[pa.RecordBatch]:
    path = Path(cfg.urls)
    if not cfg.urls:
        raise InputError("input.urls is not set: give a parquet, csv, jsonl or txt file of URLs")
    if not path.is_file():
        raise InputError(f"input.urls file not found: {path}")
    fmt = URL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"input.urls {path}: unknown format {path.suffix!r}, expected {sorted(URL_FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise InputError(f"input.urls {path} is an empty file: it holds no rows")
    try:
        for batch in _read_format(path, fmt):
            yield _select(batch, cfg, path, check_only)
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"input.urls {path} is not a readable {fmt} file: {exc}") from None


def _read_format(path: Path, fmt: str) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=4096)
    elif fmt == "csv":
        yield from pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22))
    elif fmt == "txt":
        yield from _line_batches(path, lambda n, line: {"url": line})
    else:
        yield from _line_batches(path, _json_line)


def _json_line(number: int, line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"line {number} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"line {number} must hold a JSON object, got {type(value).__name__}")
    return value


def _line_batches(path: Path, parse, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                rows.append(parse(number, line.strip()))
            if len(rows) == batch_size:
                yield pa.RecordBatch.from_pylist(rows)
                rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows)


def _select(
    batch: pa.RecordBatch, cfg: InputConfig, path: Path, check_only: bool
) -> pa.RecordBatch:
    names = batch.schema.names
    if cfg.url_column not in names and path.suffix.lower() != ".txt":
        raise InputError(f"input.urls {path}: no column {cfg.url_column!r} (columns: {names})")
    column = cfg.url_column if cfg.url_column in names else "url"
    extras = [n for n in names if n != column]
    if cfg.carry_columns is not None:
        missing = set(cfg.carry_columns) - set(extras)
        if missing:
            raise InputError(f"input.carry_columns not in {path}: {sorted(missing)}")
        extras = list(cfg.carry_columns)
    # A column named as a field the pipeline writes would overwrite it (or be overwritten):
    # carry it as input_<name>.
    arrays = [batch.column(column).cast(pa.string())]
    fields = ["url"]
    for name in extras:
        arrays.append(batch.column(name))
        fields.append(f"input_{name}" if is_reserved_field(name) else name)
    return pa.RecordBatch.from_arrays(arrays, names=fields)


def _folder_batches(folder: str) -> Iterator[pa.RecordBatch]:
    root = Path(folder)
    if not folder or not root.is_dir():
        raise InputError(f"input.folder is not a directory: {folder!r}")
    files = sorted(  # no FIFO (it is no image); a symlink is listed (broken: a read_error row)
        str(p.resolve())
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())
    )
    for start in range(0, len(files), 4096):
        yield pa.RecordBatch.from_pydict({"url": files[start : start + 4096]})


def _tar_batches(pattern: str) -> Iterator[pa.RecordBatch]:
    import tarfile

    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p)) if pattern else []
    if not paths:
        raise InputError(f"input.tars matches no files: {pattern!r}")
    for path in paths:
        urls, offsets, sizes = [], [], []
        try:
            # members are read by their offset in the file: no compression
            with open_regular(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                        urls.append(f"{os.path.abspath(path)}#{member.name}")
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise InputError(
                f"input.tars: {path} is not a readable uncompressed tar: {exc}"
            ) from None
        if urls:
            yield pa.RecordBatch.from_pydict(
                {"url": urls, "tar_offset": offsets, "tar_size": sizes}
            )


def input_digest(table: pa.Table) -> str:
    """SHA-256 of an input shard's URLs, in order: what a finished shard was crawled from."""
    digest = hashlib.sha256()
    for url in table.column("url").to_pylist():
        digest.update(f"{url}\n".encode(errors="surrogatepass"))
    return digest.hexdigest()


def source_fingerprint(table: pa.Table, kind: str) -> str:
    """``input_digest`` and, for local files and tars, each file's size and modification time
    (an image replaced in place under the same name changes it)."""
    digest = hashlib.sha256(input_digest(table).encode())
    if kind != "urls":
        paths = (
            url.split("#", 1)[0] if kind == "tars" else url for url in table["url"].to_pylist()
        )
        for path in dict.fromkeys(paths):  # each file once, in order
            try:
                st = os.stat(path)
                digest.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(b"gone\n")
    return digest.hexdigest()


def local_loader(kind: str, max_bytes: int):
    """Row -> (bytes, None) for local sources: a file path, or a member of a tar by offset.

    The same cap as a download (``crawl.max_bytes``) applies, checked before reading; a file
    that cannot be read (gone, a directory, no permission, a tar cut short) is the row's
    ``read_error``, not a bug.
    """

    def load_file(row: dict) -> tuple[bytes, None]:
        try:
            return read_regular_file(row["url"], max_bytes), None
        except FileTooLarge as exc:
            raise FetchError("too_large", f"{exc.size} bytes > max_bytes={max_bytes}") from None
        except (OSError, ValueError) as exc:
            raise FetchError("read_error", f"cannot read {row['url']}: {exc}") from None

    def load_tar_member(row: dict) -> tuple[bytes, None]:
        tar_path, size = row["url"].split("#", 1)[0], row["tar_size"]
        if size > max_bytes:
            raise FetchError("too_large", f"tar member of {size} bytes > max_bytes={max_bytes}")
        try:
            with open_regular(tar_path) as f:
                f.seek(row["tar_offset"])
                data = f.read(size)
        except (OSError, ValueError) as exc:
            raise FetchError("read_error", f"cannot read {tar_path}: {exc}") from None
        if len(data) != size:
            raise FetchError("read_error", f"{tar_path} ends {size - len(data)} bytes early")
        return data, None

    return load_file if kind == "folder" else load_tar_member
