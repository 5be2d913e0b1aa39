"""The pretraining data stream: WebDataset shards -> decoded images -> multi-crop batches.

Deterministic per (seed, rank, batch index) so that a resumed run sees the very batches an
uninterrupted one would have seen:

- each rank runs `num_workers` virtual streams; global batch g of a rank comes from stream
  g % num_workers (that is how DataLoader round-robins its workers);
- a stream is cut into segments of `reseed_every` batches; each segment starts from a fresh RNG
  seeded with (seed, rank, stream, segment): it draws shards with replacement (resampling) from
  the stream's share of the shard list (split by node, then by worker, when there are enough
  shards) and shuffles samples through a buffer;
- resuming at batch s skips, in each stream, the raw samples of the segment already consumed
  (tar reads only: no decoding, no augmentation), and the augmentation RNGs are reseeded per
  batch from (seed, rank, g).

A corrupt image or a broken tar is counted, logged with its shard and skipped; the counts ride
along with every batch (`stream_stats`: the running totals of the batch's stream, i.e. of one
DataLoader worker; the training loop sums the latest totals of every stream).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from pretrain.data.tars import tar_samples

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TRAIN_SHARD_LIST = "train_shards.txt"  # written by the pipeline into every run directory
_GLOB_CHARS = set("*?[")


class ShardListError(ValueError):
    """The `data.shards` setting names no usable shard."""


def _expand_one(entry: str) -> list[str]:
    out: list[str] = []
    for pattern in braceexpand(entry):
        if _GLOB_CHARS & set(pattern):
            out.extend(sorted(glob.glob(pattern)))
            continue
        path = Path(pattern)
        if path.is_dir():
            out.extend(_shards_of_run_dir(path))
        elif path.is_file() and path.suffix in (".txt", ".list", ".shards"):
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            for line in lines:
                if line and not line.startswith("#"):
                    out.extend(
                        _expand_one(line if os.path.isabs(line) else str(path.parent / line))
                    )
        elif path.is_file():
            out.append(str(path))
        else:
            raise ShardListError(f"data.shards: {pattern} does not exist")
    return out


def _shards_of_run_dir(run_dir: Path) -> list[str]:
    # A pipeline run names its training shards in RUN/train_shards.txt (the pipeline owns its
    # layout: curated shards once curation ran, else the crawl's); any other folder: its tars.
    listed = run_dir / TRAIN_SHARD_LIST
    if listed.is_file():
        return _expand_one(str(listed))
    found = sorted(glob.glob(str(run_dir / "*.tar")))
    if found:
        return found
    raise ShardListError(
        f"data.shards: directory {run_dir} holds neither {TRAIN_SHARD_LIST} (a pipeline run) "
        "nor *.tar files"
    )


def resolve_shards(shards: Any) -> list[str]:
    """Expand `data.shards` (a glob, a brace pattern, a list, a shard-list file or a run dir)."""
    if shards is None or shards == "" or (isinstance(shards, Sequence) and len(shards) == 0):
        raise ShardListError("data.shards is empty: give a glob, a list, a list file or a run dir")
    entries = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    found: list[str] = []
    for entry in entries:
        found.extend(_expand_one(str(entry)))
    if not found:
        raise ShardListError(f"data.shards={shards!r} matches no shard")
    return found


def _stream_shards(
    shards: list[str], rank: int, world: int, stream: int, n_streams: int
) -> list[str]:
    """The stream's share: split by node, then by worker, while each part keeps a shard."""
    if len(shards) >= world * n_streams:
        return shards[rank * n_streams + stream :: world * n_streams]
    if len(shards) >= world:
        return shards[rank::world]
    return shards


def image_keys(spec: str) -> tuple[str, ...]:
    """`data.image_key` ("jpg;jpeg;png;webp": fields tried in order) as a tuple."""
    keys = tuple(k.strip().lower().lstrip(".") for k in spec.split(";") if k.strip())
    if not keys:
        raise ValueError(f"data.image_key names no field: {spec!r}")
    return keys


def _image_key(sample: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for ext in keys:
        if ext in sample:
            return ext
    return None


# Shards are files from elsewhere: decode only the formats a sample may hold (Pillow would also
# open EPS, through Ghostscript, and dozens of rarer parsers) and refuse decompression bombs
# outright (Pillow only warns below twice its limit).
DECODE_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_PIXELS = 89_478_485  # Pillow's own warning threshold


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{img.width}x{img.height} image over {MAX_PIXELS} pixels")
        img.load()
        return img.convert("RGB")


class StreamStats:
    def __init__(self) -> None:
        self.corrupt_samples = 0
        self.corrupt_tars = 0

    def as_dict(self) -> dict[str, int]:
        return {"corrupt_samples": self.corrupt_samples, "corrupt_tars": self.corrupt_tars}


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ShardStream(IterableDataset):
    """Yields ready batches (`batch_collate(list of sample_transform(img))`) for one rank."""

    def __init__(
        self,
        shards: list[str],
        *,
        sample_transform: Callable[[Image.Image], Any],
        batch_collate: Callable[[list[Any]], dict],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        n_streams: int,
        start_batch: int = 0,
        shuffle_buffer: int = 1000,
        reseed_every: int = 500,
        image_keys: tuple[str, ...] = IMAGE_EXTENSIONS,
    ) -> None:
        self.shards = shards
        self.sample_transform = sample_transform
        self.batch_collate = batch_collate
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.n_streams = max(1, n_streams)
        self.start_batch = start_batch
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.reseed_every = max(1, reseed_every)
        self.image_keys = image_keys
        # One counter per stream: a DataLoader worker is one stream, and in-process the streams
        # share this object; every batch carries its own stream's running totals.
        self.stats = [StreamStats() for _ in range(self.n_streams)]

    def _raw_samples(
        self, rng: random.Random, shards: list[str], stats: StreamStats
    ) -> Iterator[dict]:
        """Endless raw samples (bytes) from shards drawn with replacement; broken tars skipped."""
        empty_in_a_row = 0
        while True:
            shard = rng.choice(shards)
            got = 0
            try:
                for sample in tar_samples(shard):
                    got += 1
                    yield sample
            except Exception as exc:  # a truncated or garbled tar: keep what came before
                stats.corrupt_tars += 1
                log.warning("skipping the rest of corrupt shard %s: %s", shard, exc)
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            # Never spin forever on a list of broken shards: fail loudly instead.
            if empty_in_a_row > max(20, 4 * len(shards)):
                raise RuntimeError(f"no readable sample in {len(shards)} shards, e.g. {shard}")

    def _shuffled(self, rng: random.Random, samples: Iterator[dict]) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                idx = rng.randrange(len(buffer))
                buffer[idx], buffer[-1] = buffer[-1], buffer[idx]
                yield buffer.pop()

    def _segment(self, stream: int, segment: int) -> Iterator[dict]:
        rng = random.Random(_seed_of(self.seed, self.rank, stream, segment))
        shards = _stream_shards(self.shards, self.rank, self.world_size, stream, self.n_streams)
        return self._shuffled(rng, self._raw_samples(rng, shards, self.stats[stream]))

    def _decoded(self, raw: Iterator[dict], stats: StreamStats) -> Iterator[Image.Image]:
        bad_in_a_row = 0
        for sample in raw:
            key = _image_key(sample, self.image_keys)
            try:
                if key is None:
                    raise ValueError(f"no image field {self.image_keys} among {sorted(sample)}")
                image = decode_image(sample[key])
            except Exception as exc:
                bad_in_a_row += 1
                if bad_in_a_row > 10000:
                    raise RuntimeError("10000 corrupt samples in a row: check data.shards") from exc
                stats.corrupt_samples += 1
                log.warning(
                    "skipping corrupt sample %s in %s: %s",
                    sample.get("__key__"),
                    sample.get("__url__"),
                    exc,
                )
                continue
            bad_in_a_row = 0
            yield image

    def _batch(self, images: Iterator[Image.Image], global_batch: int, stream: int) -> dict:
        # Augmentations draw from torch, random and numpy: seed all three per batch, and put the
        # caller's states back (with num_workers=0 this runs in the training process).
        batch_seed = _seed_of(self.seed, self.rank, global_batch, 7)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)
            random.seed(batch_seed)
            np.random.seed(batch_seed % 2**32)
            try:
                crops = [self.sample_transform(next(images)) for _ in range(self.batch_size)]
                batch = self.batch_collate(crops)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        batch["stream_stats"] = self.stats[stream].as_dict()
        batch["stream"] = stream
        batch["batch_index"] = global_batch
        return batch

    def _stream_batches(self, offset: int) -> Iterator[dict]:
        """Batches of the virtual stream that yields global batch `start_batch + offset` first."""
        stream = (self.start_batch + offset) % self.n_streams
        local = (self.start_batch + offset) // self.n_streams  # index within the stream
        while True:
            segment = local // self.reseed_every
            raw = self._segment(stream, segment)
            # Skip what this segment gave out before `local`: raw tar reads only.
            for _ in range((local % self.reseed_every) * self.batch_size):
                next(raw)
            images = self._decoded(raw, self.stats[stream])
            for index in range(local, (segment + 1) * self.reseed_every):
                yield self._batch(images, index * self.n_streams + stream, stream)
            local = (segment + 1) * self.reseed_every

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            if info.num_workers != self.n_streams:
                raise RuntimeError(
                    f"ShardStream built for {self.n_streams} workers, runs on {info.num_workers}"
                )
            yield from self._stream_batches(info.id)
            return
        # In-process: round-robin over the streams, as DataLoader does over its workers.
        streams = [self._stream_batches(offset) for offset in range(self.n_streams)]
        while True:
            for stream in streams:
                yield next(stream)


def build_loader(dataset: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches come ready from the dataset; workers are the dataset's virtual streams. Pinned
    batches (for CUDA) copy to the device asynchronously."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        # Own generator: creating the iterator must not draw from the training RNG.
        generator=torch.Generator().manual_seed(0),
    )


def photometric_on_device(cfg: Any, device_type: str) -> bool:
    """Whether `crops.photometric` puts the photometric augmentation on the training device."""
    mode = cfg.crops.photometric
    return mode == "device" or (mode == "auto" and device_type == "cuda")


def build_transforms(cfg: Any, output: str = "normalized") -> tuple[Callable, Callable]:
    """(multi-crop augmentation of one image, batch collate with iBOT masks) for a TrainConfig;
    `output` as in DataAugmentationDINO ("uint8" and "geometric" leave work to the device)."""
    from functools import partial

    from pretrain.data import DataAugmentationDINO, MaskingGenerator, collate_data_and_cast

    crops, loss = cfg.crops, cfg.loss
    augment = DataAugmentationDINO(
        output=output,
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        blur_probs=tuple(crops.blur_probs),
        solarize_prob=crops.solarize_prob,
        color_jitter=tuple(crops.color_jitter),
        color_jitter_prob=crops.color_jitter_prob,
        grayscale_prob=crops.grayscale_prob,
    )
    side = crops.global_crops_size // cfg.model.patch_size
    collate = partial(
        collate_data_and_cast,
        mask_ratio_tuple=tuple(loss.mask_ratio_min_max),
        mask_probability=loss.mask_probability,
        n_tokens=side * side,
        mask_generator=MaskingGenerator((side, side), max_num_patches=0.5 * side * side),
    )
    return augment, collate


def build_pretrain_loader(
    cfg: Any, *, rank: int, world_size: int, start_batch: int, device_type: str = "cpu"
) -> tuple[DataLoader, int]:
    """Multi-crop + masking batches of uint8 crops for this rank from `cfg.data.shards` (a
    TrainConfig), for a step on `device_type`; `pretrain.data.photometric.batch_to_device`
    finishes them there. Returns the loader and the number of shards found.
    """
    shards = resolve_shards(cfg.data.shards)
    on_device = photometric_on_device(cfg, device_type)
    augment, collate = build_transforms(cfg, output="geometric" if on_device else "uint8")
    dataset = ShardStream(
        shards,
        sample_transform=augment,
        batch_collate=collate,
        batch_size=cfg.data.batch_size_per_rank,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        n_streams=max(1, cfg.data.num_workers),
        start_batch=start_batch,
        shuffle_buffer=cfg.data.shuffle_buffer,
        reseed_every=cfg.data.reseed_every,
        image_keys=image_keys(cfg.data.image_key),
    )
    loader = build_loader(dataset, cfg.data.num_workers, pin_memory=device_type == "cuda")
    return loader, len(shards)
