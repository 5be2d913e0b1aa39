"""The embed stage over one crawl shard: decode, preprocess, ViT forward, store float16 features.

Plain functions and one model wrapper, no Ray: an embedding actor (pipeline/runner.py) holds an
`Embedder` and calls `embed_crawl_shard` per shard; tests call them directly.

Preprocessing is DINOv2's evaluation transform: resize the short side to image_size / 0.875
(bicubic), centre crop image_size, ImageNet normalisation (done on the model's device). Features
are the L2-normalised CLS token, or CLS concatenated with the mean patch token, stored as
float16 rows aligned with a keys table. Decoding runs in a thread pool that overlaps the forward
pass (PIL and torch both release the GIL).
"""

from __future__ import annotations

import collections
import glob
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import EmbedConfig
from pipeline.layout import EMBED_FAILURES_SCHEMA, CrawlShard, EmbedPart
from pipeline.resources import resolve_embed
from pipeline.shardio import iter_tar_samples, write_npy_atomic, write_parquet_atomic, write_stats
from pretrain.data.tars import read_regular_file
from pretrain.models import LoadedBackbone, load_backbone

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 0.875  # DINOv2 evaluation: resize to 256, crop 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
Image.MAX_IMAGE_PIXELS = 89_478_485  # eval sets are files from elsewhere: keep Pillow's guard


class EmbedInputError(ValueError):
    """An evaluation set or checkpoint that cannot be embedded."""


def preprocess(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3]: short side to size / 0.875, centre crop."""
    with Image.open(io.BytesIO(data)) as img:
        short = round(size / RESIZE_RATIO)
        img.draft("RGB", (short, short))  # JPEG: decode at a reduced scale when much larger
        img = img.convert("RGB")
        w, h = img.size
        scale = short / min(w, h)
        new = (max(short, round(w * scale)), max(short, round(h * scale)))
        img = img.resize(new, Image.BICUBIC, reducing_gap=None)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.array(img, dtype=np.uint8)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EmbedInputError("embed.device=cuda but this machine has no CUDA device")
    return torch.device(name)


class Embedder:
    """A backbone on a device that turns uint8 image batches into L2-normalised features.

    ``cfg.batch_size`` / ``cfg.decode_threads`` of 0 are set here for the device the model is on
    (``pipeline.resources.resolve_embed``; ``cpus``: the CPUs this process may decode on)."""

    def __init__(
        self, cfg: EmbedConfig, loaded: LoadedBackbone | None = None, cpus: float | None = None
    ) -> None:
        self.loaded = loaded or load_backbone(cfg.checkpoint)
        self.device = pick_device(cfg.device)
        self.cfg = resolve_embed(cfg, gpu=self.device.type == "cuda", cpus=cpus)
        self.model = self.loaded.model.to(self.device).eval()
        self.dim = self.loaded.embed_dim * (2 if cfg.features == "cls_patch_mean" else 1)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(shape) * 255

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W], ImageNet-normalised, on the device."""
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float16 [B, dim], each row of unit L2 norm."""
        x = self.normalise(images)
        cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = self.model.forward_features(x)
            feats = out["x_norm_clstoken"]
            if self.cfg.features == "cls_patch_mean":
                feats = torch.cat([feats, out["x_norm_patchtokens"].mean(dim=1)], dim=-1)
        feats = F.normalize(feats.float(), dim=-1)
        return feats.to(torch.float16).cpu().numpy()


def decoded(
    samples: Iterable[tuple[str, bytes | Exception]], size: int, threads: int, ahead: int
) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """(key, image or None, error or None) in input order; at most ``ahead`` decodes in flight.
    A sample given as an exception (its bytes could not be read) is that sample's error."""
    window: collections.deque[tuple[str, Future]] = collections.deque()
    with ThreadPoolExecutor(threads) as pool:
        for key, data in samples:
            if isinstance(data, Exception):
                failed: Future = Future()
                failed.set_exception(data)
                window.append((key, failed))
            else:
                window.append((key, pool.submit(preprocess, data, size)))
            while len(window) > ahead:
                yield _settle(*window.popleft())
        while window:
            yield _settle(*window.popleft())


def _settle(key: str, future: Future) -> tuple[str, np.ndarray | None, str | None]:
    try:
        return key, future.result(), None
    except Exception as exc:  # a corrupt image is a counted, recorded skip
        return key, None, f"{type(exc).__name__}: {exc}"


def embed_samples(
    embedder: Embedder, samples: Iterable[tuple[str, bytes | Exception]]
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(keys, float16 [n, dim] row-aligned with keys, [(key, error)] of undecodable samples)."""
    cfg = embedder.cfg
    keys, chunks, failures = [], [], []
    batch_keys, batch = [], []
    stream = decoded(samples, cfg.image_size, cfg.decode_threads, ahead=2 * cfg.batch_size)
    for key, image, error in stream:
        if image is None:
            failures.append((key, error))
            continue
        batch_keys.append(key)
        batch.append(image)
        if len(batch) == cfg.batch_size:
            chunks.append(embedder(np.stack(batch)))
            keys += batch_keys
            batch_keys, batch = [], []
    if batch:
        chunks.append(embedder(np.stack(batch)))
        keys += batch_keys
    empty = np.zeros((0, embedder.dim), np.float16)
    return keys, (np.concatenate(chunks) if chunks else empty), failures


class CrawlSamples:
    """(key, jpg bytes) of a crawl shard's samples that ``keep`` accepts, in tar order.

    The shard's parquet says which keys crawled fine; every one of them that the tar does not
    deliver (a member gone, a tar cut short, a tar that no longer reads) is recorded in
    ``missing`` with the reason once the stream ends, so the embed stage counts it as a failure
    instead of silently embedding a smaller pool."""

    def __init__(self, shard: CrawlShard, keep: Callable[[str], bool]) -> None:
        import pyarrow.parquet as pq

        self.shard = shard
        self.keep = keep
        table = pq.read_table(shard.parquet, columns=["key", "status"]).to_pydict()
        self.expected = {k for k, st in zip(table["key"], table["status"]) if st == "success"}
        self.missing: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        seen: set[str] = set()
        reason = "not in the crawl tar"
        try:
            for key, files in iter_tar_samples(self.shard.tar):
                if key in seen or not self.keep(key):
                    continue
                if "jpg" in files:
                    seen.add(key)
                    yield key, files["jpg"]
        except (EOFError, tarfile.TarError) as exc:  # cut short or garbled; an OSError (a
            # disk or network error, maybe passing) fails the shard's task: the next run redoes it
            reason = f"crawl tar unreadable after {len(seen)} samples: {type(exc).__name__}: {exc}"
            log.warning("shard %05d: %s", self.shard.index, reason)
        lost = sorted(k for k in self.expected - seen if self.keep(k))
        self.missing = [(key, reason) for key in lost]


def write_part(
    part: EmbedPart, keys: list[str], feats: np.ndarray, failures: list, extra: dict
) -> dict:
    """Write npy + keys (+ failures) atomically, then the done marker; return the marker."""
    part.npy.parent.mkdir(parents=True, exist_ok=True)
    write_npy_atomic(feats, part.npy)
    failed = pa.table(
        {"key": [k for k, _ in failures], "error": [e for _, e in failures]},
        schema=EMBED_FAILURES_SCHEMA,
    )
    write_parquet_atomic(pa.table({"key": pa.array(keys, pa.string())}), part.keys)
    write_parquet_atomic(failed, part.npy.with_name(f"{part.name}.failures.parquet"))
    marker = {"count": len(keys), "dim": int(feats.shape[1]), "dtype": "float16",
              "failures": len(failures), **extra}  # fmt: skip
    write_stats(marker, part.done)
    return marker


def embed_crawl_shard(
    embedder: Embedder, shard: CrawlShard, drop: set[str], part: EmbedPart, token: str
) -> dict:
    """Embed the shard's samples not in ``drop`` (dedup's duplicates) into ``part``."""
    started = time.time()
    part.done.unlink(missing_ok=True)  # not done until rewritten
    samples = CrawlSamples(shard, lambda k: k not in drop)
    keys, feats, failures = embed_samples(embedder, samples)
    failures += samples.missing
    seconds = time.time() - started
    marker = write_part(part, keys, feats, failures, {
        "shard": shard.index, "token": token, "duration_s": round(seconds, 3),
        "images_per_s": round(len(keys) / max(seconds, 1e-9), 1),
    })  # fmt: skip
    for key, error in failures[:5]:
        log.warning("shard %05d: %s does not decode: %s", shard.index, key, error)
    return marker


def eval_set_files(spec: str, what: str = "decontaminate.sets") -> list[tuple[str, str | None]]:
    """An evaluation set (a folder of images, or a glob of tars) as (path, tar member or None)."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(  # a FIFO is no image; a symlink is listed (broken: a failure)
            p
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())
        )
        items = [(str(p), None) for p in files]
    else:
        tars = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not tars:
            raise EmbedInputError(f"{what}: {spec} is neither a folder nor a tar glob")
        items = [(t, None) for t in tars if t.endswith(".tar")]
    if not items:
        raise EmbedInputError(f"{what}: {spec} holds no images (or no .tar files)")
    return items


def eval_set_samples(
    items: list[tuple[str, str | None]],
) -> Iterator[tuple[str, bytes | Exception]]:
    """(key, bytes) of every image of an evaluation set: files, or image members of tars; a file
    that does not read (gone, not a regular file, over 64 MiB) comes as (key, the error)."""
    for path, _ in items:
        if not path.endswith(".tar"):
            try:
                yield path, read_regular_file(path)
            except (OSError, ValueError) as exc:
                yield path, exc
            continue
        for key, files in iter_tar_samples(Path(path)):
            ext = next((e for e in files if f".{e.lower()}" in IMAGE_SUFFIXES), None)
            if ext is not None:
                yield f"{path}:{key}", files[ext]


def embed_eval_set(embedder: Embedder, spec: str, part: EmbedPart, token: str) -> dict:
    """Embed every image of one evaluation set into ``part``; raise if none decodes."""
    part.done.unlink(missing_ok=True)
    keys, feats, failures = embed_samples(embedder, eval_set_samples(eval_set_files(spec)))
    if not keys:
        raise EmbedInputError(
            f"decontaminate.sets: no image of {spec} decodes ({len(failures)} tried)"
        )
    return write_part(part, keys, feats, failures, {"set": spec, "token": token})


def part_intact(part: EmbedPart, token: str) -> bool:
    """Whether ``part`` is finished from the inputs ``token`` names and its files hold what its
    done marker says (a rerun re-embeds a part whose features or keys went missing or short)."""
    import pyarrow.parquet as pq

    if not part.done.exists():
        return False
    try:
        marker = json.loads(part.done.read_text())
        if not isinstance(marker, dict) or marker.get("token") != token:
            return False
        count, dim = int(marker["count"]), int(marker["dim"])
        rows = np.load(part.npy, mmap_mode="r").shape
        keys = pq.read_metadata(part.keys).num_rows
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        log.warning("%s: re-embedding, its files do not read: %s", part.done, exc)
        return False
    if rows != (count, dim) or keys != count:
        log.warning("%s: re-embedding, %s features and %d keys where it recorded %d",
                    part.done, rows, keys, count)  # fmt: skip
        return False
    return True


def read_part(part: EmbedPart, mmap: bool = True) -> tuple[np.ndarray, list[str]]:
    """(float16 [n, dim] memory-mapped, keys) of a finished part."""
    import pyarrow.parquet as pq

    feats = np.load(part.npy, mmap_mode="r" if mmap else None)
    keys = pq.read_table(part.keys)["key"].to_pylist()
    if len(keys) != feats.shape[0]:
        raise ValueError(f"{part.npy}: {feats.shape[0]} rows but {len(keys)} keys")
    return feats, keys
