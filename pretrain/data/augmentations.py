"""DINOv2 multi-crop augmentation on torchvision transforms v2.

Two global crops and `local_crops_number` local crops of one image. Every crop gets a random
resized crop (bicubic), a horizontal flip, colour jitter and grayscale; then Gaussian blur with
probability blur_probs = (global crop 1, global crop 2, local crops) = (1.0, 0.1, 0.5), the
values DINOv2 intends (its public code passes 1 - p to the blur, inverting them), and solarize on
global crop 2 only; then ImageNet normalisation. Randomness comes from torch's generator, so
`torch.manual_seed` (or the `seed` argument) makes the output reproducible.

`output` says where the work stops: "normalized" (float32 crops, everything done here),
"uint8" (every random step done here, normalisation left to the training device: a quarter of
the bytes to pin and copy), or "geometric" (crop and flip only, plus each crop's photometric
parameters drawn here, for `pretrain.data.photometric.apply_photometric` on the device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from pretrain.data.photometric import draw_params

OUTPUTS = ("normalized", "uint8", "geometric")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _probability(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


def _blur(p: float) -> v2.Transform:
    return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


class DataAugmentationDINO:
    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        blur_probs: Sequence[float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
        flip_prob: float = 0.5,
        color_jitter_prob: float = 0.8,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        grayscale_prob: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        output: str = "normalized",
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if len(blur_probs) != 3:
            raise ValueError(
                f"blur_probs needs 3 values (global 1, global 2, local), got {blur_probs}"
            )
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        for name, scale in (
            ("global_crops_scale", global_crops_scale),
            ("local_crops_scale", local_crops_scale),
        ):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(
                    f"{name} must be (low, high) with 0 < low <= high <= 1, got {scale}"
                )
        if len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5:
            raise ValueError(
                "color_jitter needs (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                f"got {color_jitter}"
            )
        brightness, contrast, saturation, hue = (float(v) for v in color_jitter)
        blur_global1, blur_global2, blur_local = (_probability(p, "blur_probs") for p in blur_probs)
        self.local_crops_number = local_crops_number

        def crop_and_flip(size: int, scale: Sequence[float]) -> v2.Transform:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(
                        size,
                        scale=tuple(scale),
                        interpolation=InterpolationMode.BICUBIC,
                        antialias=True,
                    ),
                    v2.RandomHorizontalFlip(p=_probability(flip_prob, "flip_prob")),
                ]
            )

        color = v2.Compose(
            [
                v2.RandomApply(
                    [v2.ColorJitter(brightness, contrast, saturation, hue)],
                    p=_probability(color_jitter_prob, "color_jitter_prob"),
                ),
                v2.RandomGrayscale(p=_probability(grayscale_prob, "grayscale_prob")),
            ]
        )
        normalize = (
            v2.Compose(
                [
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(mean=list(mean), std=list(std)),
                ]
            )
            if output == "normalized"
            else v2.Identity()
        )
        self.output = output
        jitter = dict(
            color_jitter=(brightness, contrast, saturation, hue),
            color_jitter_prob=_probability(color_jitter_prob, "color_jitter_prob"),
            grayscale_prob=_probability(grayscale_prob, "grayscale_prob"),
        )
        solarize = _probability(solarize_prob, "solarize_prob")
        # Per crop kind (global 1, global 2, local): what `draw_params` needs.
        self.param_settings = (
            dict(jitter, blur_prob=blur_global1, solarize_prob=0.0),
            dict(jitter, blur_prob=blur_global2, solarize_prob=solarize),
            dict(jitter, blur_prob=blur_local, solarize_prob=0.0),
        )
        self.to_uint8 = v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)])
        self.global_crop = crop_and_flip(global_crops_size, global_crops_scale)
        self.local_crop = crop_and_flip(local_crops_size, local_crops_scale)
        self.global_transform_1 = v2.Compose([color, _blur(blur_global1), normalize])
        self.global_transform_2 = v2.Compose(
            [
                color,
                _blur(blur_global2),
                v2.RandomSolarize(threshold=128, p=_probability(solarize_prob, "solarize_prob")),
                normalize,
            ]
        )
        self.local_transform = v2.Compose([color, _blur(blur_local), normalize])

    def __call__(
        self, image: Image.Image | Tensor, seed: int | None = None
    ) -> dict[str, list[Tensor]]:
        """{"global_crops": [2 x [3, G, G]], "local_crops": [n x [3, L, L]]} float32, normalised."""
        if seed is None:
            return self._crops(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._crops(image)

    def _crops(self, image: Image.Image | Tensor) -> dict[str, list[Tensor]]:
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        pixels = self.to_uint8(image)  # [3, H, W] uint8: blur/solarize act on 0-255 values
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError(f"expected an RGB image, got a tensor of shape {tuple(pixels.shape)}")
        if self.output == "geometric":
            return self._geometric_crops(pixels)
        global_crops = [
            self.global_transform_1(self.global_crop(pixels)),
            self.global_transform_2(self.global_crop(pixels)),
        ]
        local_crops = [
            self.local_transform(self.local_crop(pixels)) for _ in range(self.local_crops_number)
        ]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def _geometric_crops(self, pixels: Tensor) -> dict[str, list[Tensor]]:
        """uint8 crops after crop + flip, each with its photometric parameters drawn now."""
        g1, g2, local = self.param_settings
        global_crops = [self.global_crop(pixels), self.global_crop(pixels)]
        global_params = [draw_params(**g1), draw_params(**g2)]
        local_crops, local_params = [], []
        for _ in range(self.local_crops_number):
            local_crops.append(self.local_crop(pixels))
            local_params.append(draw_params(**local))
        return {
            "global_crops": [c.as_subclass(Tensor) for c in global_crops],
            "local_crops": [c.as_subclass(Tensor) for c in local_crops],
            "global_params": global_params,
            "local_params": local_params,
        }
