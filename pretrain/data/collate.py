"""Batch multi-crop samples and draw the iBOT masks of the global crops."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pretrain.data.masking import MaskingGenerator


def _crop_major(samples: Sequence[dict], key: str) -> torch.Tensor:
    n_crops = len(samples[0][key])
    if any(len(s[key]) != n_crops for s in samples):
        raise ValueError(f"every sample must have the same number of {key}")
    if n_crops == 0:
        return torch.empty(0)
    # crop-major: all samples' crop 0, then all samples' crop 1, ...
    return torch.stack([s[key][i] for i in range(n_crops) for s in samples])


def _draw_masks(
    n_images: int,
    n_tokens: int,
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    mask_generator: MaskingGenerator,
) -> tuple[torch.Tensor, int]:
    """Masks [n_images, n_tokens]: a mask_probability share of images masked, their ratios drawn
    stratified over mask_ratio_tuple (one per equal-width bin), in shuffled order."""
    n_masked_images = int(n_images * mask_probability)
    bounds = torch.linspace(
        float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1]), n_masked_images + 1
    )
    masks, upperbound = [], 0
    for low, high in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        ratio = low + (high - low) * torch.rand(()).item()
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * ratio))))
        upperbound += int(n_tokens * high)
    masks += [torch.from_numpy(mask_generator(0)) for _ in range(n_images - n_masked_images)]
    order = torch.randperm(n_images).tolist()
    return torch.stack([masks[i] for i in order]).flatten(1), upperbound


def collate_data_and_cast(
    samples: Sequence[dict | tuple],
    *,
    mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    n_tokens: int,
    mask_generator: MaskingGenerator,
    dtype: torch.dtype | None = None,
) -> dict:
    """Returns collated_global_crops [2B, 3, H, W] and collated_local_crops [n_local*B, 3, h, w]
    (crop-major), collated_masks bool [2B, N], mask_indices_list long [M] (flat indices of the
    masked tokens), masks_weight [M] (1 / masked tokens of each row's image), n_masked_patches
    long [1] and upperbound (a fixed bound on M for padding). Crops keep their dtype (uint8
    crops are normalised on the training device) unless `dtype` is given; samples carrying
    photometric parameters add global_params [2B, P] and local_params [n_local*B, P]."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    samples = [s[0] if isinstance(s, (tuple, list)) else s for s in samples]
    if not 0 <= mask_probability <= 1 or not 0 <= mask_ratio_tuple[0] <= mask_ratio_tuple[1] <= 1:
        raise ValueError(
            f"bad masking settings: probability {mask_probability}, ratios {tuple(mask_ratio_tuple)}"
        )
    if mask_generator.num_patches != n_tokens:
        raise ValueError(
            f"n_tokens={n_tokens} but the mask generator covers {mask_generator.num_patches} patches"
        )
    global_crops = _crop_major(samples, "global_crops")
    local_crops = _crop_major(samples, "local_crops")
    masks, upperbound = _draw_masks(
        global_crops.shape[0], n_tokens, mask_ratio_tuple, mask_probability, mask_generator
    )
    mask_indices = masks.flatten().nonzero().flatten()
    per_image_count = masks.sum(dim=-1, keepdim=True).clamp(min=1)  # [2B, 1]
    masks_weight = (1.0 / per_image_count).expand_as(masks)[masks]  # [M]
    params = {}
    if "global_params" in samples[0]:
        params = {
            "global_params": _crop_major(samples, "global_params"),
            "local_params": _crop_major(samples, "local_params"),
        }
    return {
        "collated_global_crops": global_crops if dtype is None else global_crops.to(dtype),
        "collated_local_crops": local_crops if dtype is None else local_crops.to(dtype),
        **params,
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight.float(),
        "n_masked_patches": torch.full((1,), mask_indices.shape[0], dtype=torch.long),
        "upperbound": upperbound,
    }
