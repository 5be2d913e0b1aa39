"""Training data: multi-crop augmentation, iBOT masking, collate (and the WebDataset loader).

The names below load on first use, so that the torch-free parts (`pretrain.data.tars`, the
bounded tar reader the curation pipeline's Ray workers use) import without torch."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "IMAGENET_MEAN": "pretrain.data.augmentations",
    "IMAGENET_STD": "pretrain.data.augmentations",
    "DataAugmentationDINO": "pretrain.data.augmentations",
    "collate_data_and_cast": "pretrain.data.collate",
    "MaskingGenerator": "pretrain.data.masking",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
