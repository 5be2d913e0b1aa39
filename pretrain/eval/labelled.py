"""Labelled evaluation data: an image folder (`class_name/*.jpg`) or WebDataset shards whose
samples carry a label (a `cls` field, or `label` in the json)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pretrain.data.loader import IMAGE_EXTENSIONS, decode_image, resolve_shards
from pretrain.data.tars import read_regular_file, tar_samples

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    images: list[Image.Image]
    labels: list[int]
    classes: list[str]
    skipped: int = 0


def _from_folder(root: Path) -> LabelledImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: an image folder needs one sub-folder per class")
    data = LabelledImages([], [], classes)
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
                continue
            try:  # bounded, regular files only (a FIFO or /dev/zero is a skip, not a hang)
                data.images.append(decode_image(read_regular_file(file)))
                data.labels.append(index)
            except Exception as exc:
                data.skipped += 1
                log.warning("skipping unreadable image %s: %s", file, exc)
    return data


def _sample_label(sample: dict) -> str:
    if "cls" in sample:
        return sample["cls"].decode().strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        if "label" in meta:
            return str(meta["label"])
    raise KeyError("no `cls` field and no `label` in the json")


def _from_shards(spec: str) -> LabelledImages:
    raw_labels: list[str] = []
    images: list[Image.Image] = []
    skipped = 0
    for shard in resolve_shards(spec):
        for sample in tar_samples(shard):
            key = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            try:
                label = _sample_label(sample)
                images.append(decode_image(sample[key]) if key else None)
                if images[-1] is None:
                    raise ValueError("no image field")
                raw_labels.append(label)
            except Exception as exc:
                if len(images) > len(raw_labels):
                    images.pop()
                skipped += 1
                log.warning("skipping sample %s of %s: %s", sample.get("__key__"), shard, exc)
    # Integer labels sort numerically, names alphabetically.
    names = sorted(
        set(raw_labels),
        key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s),
    )
    index = {name: i for i, name in enumerate(names)}
    return LabelledImages(images, [index[x] for x in raw_labels], names, skipped)


def labels_in(data: LabelledImages, reference: LabelledImages, what: str = "val") -> list[int]:
    """``data``'s labels as indices into ``reference``'s classes (by name). Each set numbers its
    own classes, so a val set that lacks one of train's classes would otherwise shift every
    label after it; a class that train does not have is an error."""
    index = {name: i for i, name in enumerate(reference.classes)}
    unknown = sorted(set(data.classes) - set(index))
    if unknown:
        raise ValueError(f"{what} has classes that train lacks: {unknown[:10]}")
    return [index[data.classes[label]] for label in data.labels]


def load_labelled(spec: str) -> LabelledImages:
    path = Path(spec)
    data = (
        _from_folder(path) if path.is_dir() and not any(path.glob("*.tar")) else _from_shards(spec)
    )
    if not data.images:
        raise ValueError(f"{spec}: no labelled image found")
    log.info(
        "%s: %d images, %d classes, %d skipped",
        spec,
        len(data.images),
        len(data.classes),
        data.skipped,
    )
    return data
