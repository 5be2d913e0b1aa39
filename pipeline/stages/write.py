"""The write stage: curated WebDataset shards copied from the crawl tars (no re-encoding).

Plain functions, no Ray: the runner plans the output once (`plan_shards`), then one Ray task per
output shard calls `write_curated_shard`; tests call them directly.

    RUN/curated/shards/NNNNNN.tar         curate.shard_size samples (the last one fewer)
    RUN/curated/shards/NNNNNN.done.json   written last: shard, count, bytes, sha256, keys, token

A sample is ``KEY.jpg`` (the crawl's JPEG bytes, unchanged) then ``KEY.json`` (the crawl's JSON,
unchanged, plus the curation fields), USTAR, mtime 0: the crawl's format, so the same shard
written twice is the same bytes.

Keys: a sample selected once keeps its crawl key (``000030012``). A sample selected ``m`` times
(balanced sampling with repeats) appears ``m`` times: copy 0 under the crawl key, copy ``i`` under
``KEY_r{i}`` (``000030012_r1``). Every JSON carries ``source_key`` (the crawl key) and
``repeat_index`` (0 .. m-1), so a reader can always group the copies of one image.

Crash safety: a shard is written under a temporary name (`pretrain.configtools.AtomicFile`),
fsynced and renamed, and its done marker is written after it; the marker of a shard being rewritten is
removed first. A SIGKILL leaves at worst a temporary file or a tar without a marker:
`clear_partial` (called by the driver before it launches the tasks) removes both, and the rerun
writes the shards that have no valid marker (`shard_done`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.layout import (
    CRAWL_SCHEMA,
    crawl_shard_files,
    curated_shard_name,
    shard_of_key,
    token,
)
from pipeline.shardio import MemberIndex, TarSink, read_stats, tar_member_index, write_stats
from pretrain.models.loading import file_sha256

# --- layout (to move to pipeline.layout) ---------------------------------------------------------
DONE_SUFFIX = ".done.json"

# --- sample conventions -------------------------------------------------------------------------
REPEAT_SEP = "_r"  # copy i > 0 of KEY is KEY_r{i}
SOURCE_KEY_FIELD = "source_key"  # JSON field: the crawl key a curated sample was copied from
REPEAT_FIELD = "repeat_index"  # JSON field: which copy (0 .. multiplicity - 1)
# A curated manifest row (`validate_curated`): the output key, its shard (int or "NNNNNN"), the
# crawl manifest's jpg_sha256 of the source; the curation columns (every column that is not a
# crawl column) and the crawl columns below must equal the sample's JSON field of the same name.
MANIFEST_KEY = "key"
MANIFEST_SHARD = "shard"
MANIFEST_JPG_SHA = "jpg_sha256"
MANIFEST_REQUIRED = (MANIFEST_KEY, MANIFEST_SHARD, MANIFEST_JPG_SHA)
CRAWL_COLUMNS = frozenset(CRAWL_SCHEMA.names)
CRAWL_CHECKED = ("url", "sha256", "width", "height", "bytes", "jpg_sha256")  # as the JSON has them

_REPEAT_RE = re.compile(rf"^(.+){REPEAT_SEP}([1-9][0-9]*)$")
_BAD_KEY = re.compile(r"[./\s]")  # WebDataset splits KEY.ext at the first dot

Entry = tuple[str, str]  # (output key, source key)


class CuratedShardError(RuntimeError):
    """A curated shard cannot be written complete; names the shard and the sample."""

    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(shard, key, reason)  # args = the init arguments: pickles (Ray)
        self.shard, self.key, self.reason = shard, key, reason

    def __str__(self) -> str:
        return f"curated shard {self.shard}: sample {self.key}: {self.reason}"


# --- paths ----------------------------------------------------------------------------------------


def curated_shard_path(shards_dir: Path, index: int) -> Path:
    return Path(shards_dir) / f"{curated_shard_name(index)}.tar"


def done_path(out_tar: Path) -> Path:
    out_tar = Path(out_tar)
    return out_tar.with_name(out_tar.name.removesuffix(".tar") + DONE_SUFFIX)


def crawl_sources(crawl_dir: Path, source_keys: Iterable[str]) -> dict[str, Path]:
    """Source key -> the crawl tar that holds it (`pipeline.layout.shard_of_key`)."""
    return {k: crawl_shard_files(crawl_dir, shard_of_key(k)).tar for k in source_keys}


# --- keys -----------------------------------------------------------------------------------------


def output_key(source_key: str, repeat: int) -> str:
    return source_key if repeat == 0 else f"{source_key}{REPEAT_SEP}{repeat}"


def parse_output_key(key: str) -> tuple[str, int]:
    """(source key, repeat index) of an output key."""
    m = _REPEAT_RE.match(key)
    return (m.group(1), int(m.group(2))) if m else (key, 0)


def _check_source_key(key: str) -> None:
    if not isinstance(key, str) or not key or _BAD_KEY.search(key):
        raise ValueError(f"bad source key {key!r}: empty, or holds a dot, slash or space")
    if parse_output_key(key)[1]:
        raise ValueError(f"bad source key {key!r}: ends like a repeat key (KEY{REPEAT_SEP}N)")


# --- reading the crawl tars -----------------------------------------------------------------------


def _index_of(member_index: dict | None, cache: dict, path: Path) -> MemberIndex:
    for candidate in (path, str(path)):
        if member_index is not None and candidate in member_index:
            return member_index[candidate]
    if path not in cache:  # not given: read the headers here (once per call)
        cache[path] = tar_member_index(path)
    return cache[path]


# --- planning -------------------------------------------------------------------------------------


def plan_shards(
    keys: Sequence[str], multiplicity: Sequence[int], shard_size: int, seed: int
) -> list[list[Entry]]:
    """(output key, source key) per output shard: every key ``multiplicity`` times (0: not
    written), in an order shuffled with ``seed``, shards of ``shard_size`` but the last.

    Deterministic: a function of the set of (key, multiplicity) and the seed (not of the order
    of ``keys``), for a given NumPy. The runner should store the plan (the curated manifest) and
    reuse it on a rerun rather than recompute it."""
    if len(keys) != len(multiplicity):
        raise ValueError(f"{len(keys)} keys but {len(multiplicity)} multiplicities")
    if int(shard_size) < 1:
        raise ValueError(f"curate.shard_size must be >= 1, got {shard_size}")
    if int(seed) < 0:
        raise ValueError(f"curate.seed must be >= 0, got {seed}")
    counts = np.asarray(multiplicity)
    if counts.size and (counts.dtype.kind not in "iu" or counts.min() < 0):
        raise ValueError("multiplicity must be integers >= 0")
    copies: dict[str, int] = {}
    for key, m in zip(keys, counts.tolist()):
        _check_source_key(key)
        if key in copies:
            raise ValueError(f"source key {key} selected twice (use its multiplicity)")
        copies[key] = m
    entries = [(output_key(k, r), k) for k in sorted(copies) for r in range(copies[k])]
    order = np.random.default_rng(int(seed)).permutation(len(entries))
    shuffled = [entries[i] for i in order.tolist()]
    size = int(shard_size)
    return [shuffled[i : i + size] for i in range(0, len(shuffled), size)]


def shard_token(entries: Sequence[Entry], fields: dict[str, dict]) -> str:
    """What a curated shard is made from: its entries and their sources' curation fields."""
    sources = sorted({src for _, src in entries})
    return token([list(e) for e in entries], {s: _plain(fields.get(s, {})) for s in sources})


def curated_manifest_rows(
    plan: Sequence[Sequence[Entry]], fields: dict[str, dict], jpg_sha256: dict[str, str]
) -> list[dict]:
    """One row per output sample, in plan order: key, shard, source_key, repeat_index, the
    crawl manifest's jpg_sha256 and the curation fields: what `validate_curated` checks."""
    rows = []
    for shard, entries in enumerate(plan):
        for out_key, src in entries:
            row = dict(_plain(fields.get(src, {})))
            row.update({
                MANIFEST_KEY: out_key, MANIFEST_SHARD: shard, SOURCE_KEY_FIELD: src,
                REPEAT_FIELD: parse_output_key(out_key)[1], MANIFEST_JPG_SHA: jpg_sha256[src],
            })  # fmt: skip
            rows.append(row)
    return rows


# --- writing --------------------------------------------------------------------------------------


def write_curated_shard(
    entries: Sequence[Entry],
    out_tar: Path,
    sources: dict[str, Path],
    member_index: dict | None,
    fields: dict[str, dict],
) -> dict:
    """Write one curated shard (module docstring) and return its done marker.

    ``entries``: (output key, source key) in shard order; ``sources``: source key -> crawl tar;
    ``member_index``: crawl tar path -> `tar_member_index` (a tar not in it is indexed here);
    ``fields``: source key -> curation fields merged into the sample's JSON (every source needs
    an entry, ``{}`` for none); a field may not change a crawl field. Raises `CuratedShardError` (shard and key named) when a sample is
    missing, unreadable or does not match its crawl hash: no tar and no marker are left then.
    """
    out_tar = Path(out_tar)
    name = out_tar.name.removesuffix(".tar")
    marker_path = done_path(out_tar)
    _check_entries(name, entries)
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    marker_path.unlink(missing_ok=True)  # not done until rewritten below
    cache: dict = {}
    handles: dict[Path, io.BufferedReader] = {}
    sink = TarSink(out_tar)
    try:
        for out_key, src in entries:
            jpeg, meta = _read_sample(name, out_key, src, sources, member_index, cache, handles)
            if src not in fields:
                raise CuratedShardError(name, out_key, f"no curation fields for source {src}")
            sink.add(out_key, jpeg, _curated_meta(name, out_key, src, meta, fields[src]))
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    finally:
        for handle in handles.values():
            handle.close()
    marker = {
        "shard": int(name) if name.isdigit() else name,
        "count": len(entries),
        "bytes": out_tar.stat().st_size,
        "sha256": file_sha256(out_tar),
        "keys": [k for k, _ in entries],
        "token": shard_token(entries, fields),
    }
    write_stats(marker, marker_path)
    return marker


def _check_entries(name: str, entries: Sequence[Entry]) -> None:
    seen: set[str] = set()
    for out_key, src in entries:
        if out_key in seen:
            raise CuratedShardError(name, out_key, "output key appears twice in the shard")
        seen.add(out_key)
        if parse_output_key(out_key)[0] != src:
            raise CuratedShardError(name, out_key, f"output key does not name its source {src}")


def _read_sample(name, out_key, src, sources, member_index, cache, handles) -> tuple[bytes, dict]:
    def fail(reason: str) -> CuratedShardError:
        return CuratedShardError(name, out_key if out_key == src else f"{out_key} ({src})", reason)

    path = sources.get(src)
    if path is None:
        raise fail(f"source key {src} has no crawl tar in `sources`")
    path = Path(path)
    try:
        members = _index_of(member_index, cache, path).get(src)
        if members is None or "jpg" not in members or "json" not in members:
            have = sorted(members) if members else "no member"
            raise fail(f"source key {src} missing from crawl tar {path} (has {have})")
        if path not in handles:
            handles[path] = open(path, "rb")  # closed by the caller
        data = {}
        for ext in ("jpg", "json"):
            offset, size = members[ext]
            handles[path].seek(offset)
            data[ext] = handles[path].read(size)
            if len(data[ext]) != size:
                raise fail(f"{path}: {src}.{ext} truncated ({len(data[ext])} of {size} bytes)")
        meta = json.loads(data["json"])
    except CuratedShardError:
        raise
    except (OSError, ValueError, tarfile.TarError) as exc:
        raise fail(f"crawl tar {path} unreadable: {type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict):
        raise fail(f"{path}: {src}.json is not an object")
    recorded = meta.get(MANIFEST_JPG_SHA)
    if recorded is not None and recorded != hashlib.sha256(data["jpg"]).hexdigest():
        raise fail(f"{path}: {src}.jpg does not match its crawl jpg_sha256")
    return data["jpg"], meta


def _curated_meta(name: str, out_key: str, src: str, meta: dict, extra: dict) -> dict:
    out = dict(meta)
    added = dict(_plain(extra))
    added[SOURCE_KEY_FIELD] = src
    added[REPEAT_FIELD] = parse_output_key(out_key)[1]
    for field, value in added.items():
        if field in meta and not _same(meta[field], value):
            raise CuratedShardError(
                name, out_key, f"curation field {field}={value!r} would overwrite the crawl's "
                f"{meta[field]!r}"
            )  # fmt: skip
        out[field] = value
    return out


def _plain(value):
    """JSON-ready: NumPy scalars and arrays as Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# --- resume ---------------------------------------------------------------------------------------


def read_done(out_tar: Path) -> dict | None:
    path = done_path(out_tar)
    try:
        return read_stats(path)
    except (OSError, ValueError):
        return None


def shard_done(
    out_tar: Path, entries: Sequence[Entry], fields: dict[str, dict] | None = None
) -> bool:
    """The shard's tar and marker exist and the marker was written for these entries (in this
    order) and, when ``fields`` is given, these curation fields: a changed plan or changed
    fields make it not done, and so does a tar whose size is not the marker's (cut short or
    edited). Reads the marker and the tar's size only (`validate_curated` hashes the tar)."""
    marker = read_done(out_tar)
    return (
        marker is not None
        and Path(out_tar).exists()
        and marker.get("bytes") == Path(out_tar).stat().st_size
        and marker.get("keys") == [k for k, _ in entries]
        and (fields is None or marker.get("token") == shard_token(entries, fields))
    )


def remove_beyond(shards_dir: Path, count: int) -> list[Path]:
    """Remove the shards numbered ``count`` and up (tar and marker): what an earlier, larger
    selection left behind, which `validate` would report and a glob over the folder would train
    on. Returns what was removed."""
    removed = []
    for path in sorted(Path(shards_dir).glob("*.tar")) + sorted(
        Path(shards_dir).glob(f"*{DONE_SUFFIX}")
    ):
        stem = path.name.split(".", 1)[0]
        if stem.isdigit() and int(stem) >= count:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def clear_partial(shards_dir: Path) -> list[Path]:
    """Remove what a killed run left half-done: temporary files, tars without a done marker and
    markers without their tar. Returns what was removed. Call it before the tasks start (never
    while writers run: a tar is renamed into place before its marker is written)."""
    shards_dir = Path(shards_dir)
    removed: list[Path] = []
    if not shards_dir.is_dir():
        return removed
    for tmp in sorted(shards_dir.glob(".*.tmp")):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    for tar in sorted(shards_dir.glob("*.tar")):
        if not done_path(tar).exists():
            tar.unlink(missing_ok=True)
            removed.append(tar)
    for marker in sorted(shards_dir.glob(f"*{DONE_SUFFIX}")):
        if not marker.with_name(marker.name.removesuffix(DONE_SUFFIX) + ".tar").exists():
            marker.unlink(missing_ok=True)
            removed.append(marker)
    return removed


# --- validation -----------------------------------------------------------------------------------


def validate_curated(
    shards_dir: Path, manifest_rows: Sequence[dict], curation_columns: Sequence[str] | None = None
) -> list[str]:
    """Problems of the curated shards against the curated manifest's rows (`MANIFEST_KEY` ...):
    per shard the same output keys in the same order, each sample jpg + json only; the JSON's
    ``curation_columns`` (default: every column of the row that is not a crawl column, key or
    shard) and `CRAWL_CHECKED` columns equal to the row's; ``source_key`` / ``repeat_index``
    consistent with the key; the JPEG's sha256 equal to the row's ``jpg_sha256``; images that
    decode at the recorded size; done markers present, with the tar's sha256, count and keys;
    missing tars, extra tars and markers, leftover temporary files."""
    shards_dir = Path(shards_dir)
    problems: list[str] = []
    by_shard: dict[int, list[dict]] = {}
    seen: set[str] = set()
    for row in manifest_rows:
        missing = [c for c in MANIFEST_REQUIRED if c not in row]
        if missing:
            problems.append(f"manifest row {row.get(MANIFEST_KEY)!r} lacks {missing}")
            continue
        if row[MANIFEST_KEY] in seen:
            problems.append(f"manifest: output key {row[MANIFEST_KEY]} appears twice")
        seen.add(row[MANIFEST_KEY])
        by_shard.setdefault(int(row[MANIFEST_SHARD]), []).append(row)
    for index in sorted(by_shard):
        tar = curated_shard_path(shards_dir, index)
        problems += _validate_shard(
            curated_shard_name(index), tar, by_shard[index], curation_columns
        )
    expected = {curated_shard_path(shards_dir, i).name for i in by_shard}
    for tar in sorted(shards_dir.glob("*.tar")):
        if tar.name not in expected:
            problems.append(f"{tar.name}: extra tar, not in the manifest")
    for marker in sorted(shards_dir.glob(f"*{DONE_SUFFIX}")):
        if marker.name.removesuffix(DONE_SUFFIX) + ".tar" not in expected:
            problems.append(f"{marker.name}: extra done marker, not in the manifest")
    for tmp in sorted(shards_dir.glob(".*.tmp")):
        problems.append(f"{tmp.name}: leftover temporary file")
    return problems


def _validate_shard(name: str, tar: Path, rows: list[dict], columns) -> list[str]:
    if not tar.exists():
        return [f"{name}: tar missing ({len(rows)} samples in the manifest)"]
    problems = []
    marker = read_done(tar)
    if marker is None:
        problems.append(f"{name}: no done marker (partial shard)")
    elif marker.get("sha256") != file_sha256(tar):
        problems.append(f"{name}: tar sha256 does not match its done marker")
    by_key = {r[MANIFEST_KEY]: r for r in rows}
    order: list[str] = []
    try:  # one sample in memory at a time
        for key, files in _iter_curated_tar(tar, name, problems):
            order.append(key)
            if key in by_key:
                problems += _validate_sample(name, by_key[key], files, columns)
    except (OSError, tarfile.TarError) as exc:
        return problems + [f"{name}: unreadable tar: {type(exc).__name__}: {exc}"]
    if marker is not None and (marker.get("keys") != order or marker.get("count") != len(order)):
        problems.append(f"{name}: done marker keys / count differ from the tar's")
    found = set(order)
    for key in [k for k in by_key if k not in found]:
        problems.append(f"{name}: {key} in the manifest but not in the tar")
    for key in [k for k in order if k not in by_key]:
        problems.append(f"{name}: {key} in the tar but not in the manifest")
    if found == set(by_key) and order != list(by_key):
        problems.append(f"{name}: samples not in the manifest's order")
    return problems


def _iter_curated_tar(tar_path: Path, name: str, problems: list[str]):
    """(key, {ext: bytes}) per sample in tar order (members of a key adjacent); appends to
    ``problems`` non-file members, repeated members and keys that come back later."""
    seen: set[str] = set()
    key, files = None, {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                problems.append(f"{name}: member {member.name} is not a regular file")
                continue
            stem, _, ext = member.name.partition(".")
            if stem != key:
                if key is not None:
                    yield key, files
                if stem in seen:
                    problems.append(f"{name}: {stem} appears twice (non-adjacent members)")
                key, files = stem, {}
                seen.add(stem)
            if ext in files:
                problems.append(f"{name}: member {member.name} appears twice")
            files[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, files


def _validate_sample(name: str, row: dict, files: dict[str, bytes], columns) -> list[str]:
    key = row[MANIFEST_KEY]
    if set(files) != {"jpg", "json"}:
        return [f"{name}: {key} has members {sorted(files)}, expected jpg + json"]
    try:
        meta = json.loads(files["json"])
    except ValueError as exc:
        return [f"{name}: {key} json does not parse: {exc}"]
    problems = []
    derived = dict(zip((SOURCE_KEY_FIELD, REPEAT_FIELD), parse_output_key(key)))
    for field, value in derived.items():
        for where, have in (("manifest", row), ("json", meta)):
            if field in have and have[field] != value:
                problems.append(f"{name}: {key} {where} {field}={have[field]!r} != {value!r}")
        if field not in meta:
            problems.append(f"{name}: {key} json lacks {field}")
    if columns is None:
        columns = [c for c in row if c not in CRAWL_COLUMNS and c not in MANIFEST_REQUIRED]
    for column in [*columns, *(c for c in CRAWL_CHECKED if c in row)]:
        value = row.get(column)
        if column in derived:
            continue  # checked above
        if column not in meta:
            problems.append(f"{name}: {key} json lacks {column} (manifest {value!r})")
        elif not _same(meta[column], value):
            problems.append(f"{name}: {key} json {column}={meta[column]!r} != manifest {value!r}")
    if hashlib.sha256(files["jpg"]).hexdigest() != row[MANIFEST_JPG_SHA]:
        problems.append(f"{name}: {key} jpg bytes do not match the crawl's jpg_sha256")
    try:
        with Image.open(io.BytesIO(files["jpg"])) as img:
            img.load()
            size = img.size
    except Exception as exc:
        return problems + [f"{name}: {key} jpg does not decode: {type(exc).__name__}: {exc}"]
    recorded = (meta.get("width"), meta.get("height"))
    if None not in recorded and size != recorded:
        problems.append(f"{name}: {key} image is {size}, json says {recorded}")
    return problems
