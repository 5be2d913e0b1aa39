"""Training data: multi-crop augmentation, iBOT masking, collate (and the WebDataset loader)."""

from pretrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO
from pretrain.data.collate import collate_data_and_cast
from pretrain.data.masking import MaskingGenerator

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataAugmentationDINO",
    "MaskingGenerator",
    "collate_data_and_cast",
]
