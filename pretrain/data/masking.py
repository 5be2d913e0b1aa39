"""BEiT-style block masking: rectangles of patches until the requested count is masked."""

from __future__ import annotations

import math

import numpy as np
import torch


class MaskingGenerator:
    """`generator(n)` returns a bool [h, w] mask with about n patches set, built from random
    rectangles of at least `min_num_patches` and at most `max_num_patches` patches each, with
    aspect ratios in [min_aspect, max_aspect]. Randomness is drawn from torch's generator (one
    draw per call), so DataLoader worker seeding and `torch.manual_seed` govern it; pass `rng`
    to use a NumPy generator instead."""

    def __init__(
        self,
        input_size: tuple[int, int],
        max_num_patches: int | float | None = None,
        *,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = input_size
        if height < 1 or width < 1:
            raise ValueError(f"input_size must be positive patch counts, got {input_size}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.height, self.width = int(height), int(width)
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else int(max_num_patches)
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Masks one random rectangle; returns how many new patches it set (0 if 10 tries fail)."""
        for _ in range(10):
            # Like random.uniform, this also allows max_mask_patches < min_num_patches.
            target_area = (
                self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            )
            low_log, high_log = self.log_aspect_ratio
            aspect = math.exp(low_log + (high_log - low_log) * rng.random())
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                region = mask[top : top + h, left : left + w]
                new = h * w - int(region.sum())
                if 0 < new <= max_mask_patches:
                    region[...] = True
                    return new
        return 0

    def __call__(
        self, num_masking_patches: int = 0, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        if rng is None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        mask = np.zeros((self.height, self.width), dtype=np.bool_)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask
