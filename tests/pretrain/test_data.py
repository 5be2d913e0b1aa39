"""Multi-crop augmentation, block masking and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataAugmentationDINO,
    MaskingGenerator,
    collate_data_and_cast,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
# Whole-image crops and no colour changes: the only random step left is the one under test.
PLAIN = dict(
    global_crops_scale=(1.0, 1.0),
    local_crops_scale=(1.0, 1.0),
    global_crops_size=64,
    local_crops_size=32,
    local_crops_number=4,
    flip_prob=0.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    solarize_prob=0.0,
    blur_probs=(0.0, 0.0, 0.0),
)


@pytest.fixture(scope="module")
def small_photo(astronaut) -> Image.Image:
    return astronaut.resize((96, 96), Image.BICUBIC)


def test_crops_have_the_configured_shapes_and_normalised_range(astronaut):
    out = DataAugmentationDINO()(astronaut, seed=0)
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 98, 98)] * 8
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.dtype == torch.float32
        assert (crop >= low - 1e-5).all() and (crop <= high + 1e-5).all()
    assert out["global_crops"][0].std() > 0.3  # a photo, not a constant


def test_augmentation_is_deterministic_under_a_seed(small_photo):
    aug = DataAugmentationDINO(
        **{**PLAIN, "global_crops_scale": (0.32, 1.0), "color_jitter_prob": 0.8}
    )
    first, again, other = (
        aug(small_photo, seed=7),
        aug(small_photo, seed=7),
        aug(small_photo, seed=8),
    )
    for a, b in zip(
        first["global_crops"] + first["local_crops"], again["global_crops"] + again["local_crops"]
    ):
        assert torch.equal(a, b)
    assert not torch.equal(first["global_crops"][0], other["global_crops"][0])
    torch.manual_seed(3)
    by_global_seed = aug(small_photo)["global_crops"][1]
    torch.manual_seed(3)
    assert torch.equal(aug(small_photo)["global_crops"][1], by_global_seed)


def _changed(crops: list[torch.Tensor], reference: torch.Tensor) -> list[bool]:
    return [not torch.allclose(c, reference, atol=1e-6) for c in crops]


def test_blur_probabilities_are_the_intended_ones(small_photo):
    plain = DataAugmentationDINO(**PLAIN)(small_photo)
    aug = DataAugmentationDINO(**{**PLAIN, "blur_probs": (1.0, 0.1, 0.5)})
    g1, g2, local = [], [], []
    for seed in range(40):
        out = aug(small_photo, seed=seed)
        g1 += _changed(out["global_crops"][:1], plain["global_crops"][0])
        g2 += _changed(out["global_crops"][1:], plain["global_crops"][1])
        local += _changed(out["local_crops"], plain["local_crops"][0])
    # sigma is drawn in (0.1, 2); below about 0.25 a 9-tap blur leaves uint8 pixels unchanged
    assert np.mean(g1) >= 0.8
    assert np.mean(g2) <= 0.25
    assert 0.3 <= np.mean(local) <= 0.62


def test_solarize_touches_global_crop_2_only(small_photo):
    plain = DataAugmentationDINO(**PLAIN)(small_photo)
    out = DataAugmentationDINO(**{**PLAIN, "solarize_prob": 1.0})(small_photo)
    assert torch.equal(out["global_crops"][0], plain["global_crops"][0])
    assert all(torch.equal(a, b) for a, b in zip(out["local_crops"], plain["local_crops"]))
    pixels = ((plain["global_crops"][1] * STD + MEAN) * 255).round()
    solarized = torch.where(pixels >= 128, 255 - pixels, pixels)
    torch.testing.assert_close(
        out["global_crops"][1], (solarized / 255 - MEAN) / STD, atol=1e-4, rtol=0
    )


def test_bad_augmentation_settings_are_named():
    with pytest.raises(ValueError, match="blur_probs"):
        DataAugmentationDINO(blur_probs=(1.0, 0.1))
    with pytest.raises(ValueError, match="solarize_prob"):
        DataAugmentationDINO(solarize_prob=1.5)
    with pytest.raises(ValueError, match="local_crops_scale"):
        DataAugmentationDINO(local_crops_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="color_jitter"):
        DataAugmentationDINO(color_jitter=(0.4, 0.4, 0.2, 0.7))


def test_colour_jitter_strengths_are_configurable(small_photo):
    plain = DataAugmentationDINO(**PLAIN)(small_photo)["global_crops"][0]
    hue_only = {**PLAIN, "color_jitter_prob": 1.0, "color_jitter": (0.0, 0.0, 0.0, 0.5)}
    aug = DataAugmentationDINO(**hue_only)
    moved = [(aug(small_photo, seed=s)["global_crops"][0] - plain).abs().mean() for s in range(8)]
    assert min(moved) > 0 and max(moved) > 0.2  # hue shifts of up to half the colour wheel
    off = {**PLAIN, "color_jitter_prob": 1.0, "color_jitter": (0.0, 0.0, 0.0, 0.0)}
    assert torch.equal(DataAugmentationDINO(**off)(small_photo, seed=1)["global_crops"][0], plain)


def test_masking_generator_masks_about_the_requested_count():
    generator = MaskingGenerator((16, 16), max_num_patches=128)
    torch.manual_seed(0)
    for target in (0, 10, 50, 100, 128):
        counts = [int(generator(target).sum()) for _ in range(20)]
        assert all(c <= target for c in counts)
        assert np.mean(counts) >= 0.85 * target
    torch.manual_seed(1)
    first = generator(60)
    torch.manual_seed(1)
    assert (
        np.array_equal(first, generator(60)) and first.shape == (16, 16) and first.dtype == np.bool_
    )


def _samples(batch: int, n_local: int = 2) -> list[dict]:
    # sample i's crop j is filled with 10 * i + j, so the collated order can be read back
    def crop(value, size):
        return torch.full((3, size, size), float(value))

    return [
        {
            "global_crops": [crop(10 * i + j, 28) for j in range(2)],
            "local_crops": [crop(10 * i + 2 + j, 14) for j in range(n_local)],
        }
        for i in range(batch)
    ]


def test_collate_is_crop_major_and_masks_half_of_the_global_crops():
    torch.manual_seed(0)
    generator = MaskingGenerator((2, 2))
    batch = collate_data_and_cast(
        _samples(3), n_tokens=4, mask_generator=generator, dtype=torch.bfloat16
    )
    assert batch["collated_global_crops"].dtype == torch.bfloat16
    assert batch["collated_global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert batch["collated_local_crops"][:, 0, 0, 0].tolist() == [2, 12, 22, 3, 13, 23]
    assert batch["collated_masks"].shape == (6, 4)


def test_masks_follow_the_stratified_ratio_distribution():
    torch.manual_seed(0)
    n_tokens, n_images = 256, 32
    generator = MaskingGenerator((16, 16), max_num_patches=128)
    ratios = []
    for _ in range(5):
        batch = collate_data_and_cast(
            _samples(n_images // 2, n_local=0), n_tokens=n_tokens, mask_generator=generator
        )
        masks = batch["collated_masks"]
        counts = masks.sum(1)
        masked = counts[counts > 0].sort().values
        assert len(masked) <= 16 and (counts == 0).sum() >= 16  # half the crops, no more
        bounds = torch.linspace(0.1, 0.5, 17)[1:] * n_tokens  # each stratum's upper bound
        assert (masked <= bounds[-len(masked) :].floor()).all()
        ratios += (masked / n_tokens).tolist()
        # indices, weights and counts describe the same masks
        assert torch.equal(batch["mask_indices_list"], masks.flatten().nonzero().flatten())
        assert batch["n_masked_patches"].tolist() == [int(counts.sum())]
        assert batch["upperbound"] >= int(counts.sum())
        weights = torch.zeros(masks.numel())
        weights[batch["mask_indices_list"]] = batch["masks_weight"]
        per_image = weights.view(n_images, n_tokens).sum(1)
        torch.testing.assert_close(per_image, (counts > 0).float())
    assert 0.25 <= np.mean(ratios) <= 0.31  # stratified over [0.1, 0.5]: mean 0.3
    assert min(ratios) < 0.15 and max(ratios) > 0.4


def test_collate_rejects_a_mask_generator_of_another_size():
    with pytest.raises(ValueError, match="n_tokens=16"):
        collate_data_and_cast(_samples(2), n_tokens=16, mask_generator=MaskingGenerator((2, 2)))


def test_shapes_backgrounds_are_grey_by_default_and_checked():
    import random

    from pretrain.data.synthetic import draw_shape

    for seed in range(5):
        grey = draw_shape("circle", random.Random(seed), 64).getpixel((0, 0))
        assert grey[0] == grey[1] == grey[2]  # corners are background: the shape keeps inside
    coloured = [
        draw_shape("cross", random.Random(s), 64, "colour").getpixel((0, 0)) for s in range(5)
    ]
    assert any(len(set(pixel)) > 1 for pixel in coloured)
    with pytest.raises(ValueError, match="background"):
        draw_shape("circle", random.Random(0), 64, "blue")


def test_silhouettes_are_deterministic_and_only_the_outline_is_shared():
    import numpy as np

    from pretrain.data import silhouettes

    first = list(silhouettes.samples_with_background(30, seed=4))
    again = list(silhouettes.samples(30, seed=4))
    assert [k for k, *_ in first] == [k for k, *_ in again]
    assert all(np.array_equal(np.asarray(a[-1]), np.asarray(b[-1])) for a, b in zip(first, again))
    assert [label for _, label, _, _ in first] == [i % 10 for i in range(30)]
    assert all(img.size == (64, 64) and img.mode == "RGB" for *_, img in first)
    assert len({photo for _, _, photo, _ in first}) > 5  # backgrounds from many photographs
    # Each class has its own outline: masks drawn at the same place and size differ pairwise.
    masks = [np.asarray(silhouettes.silhouette_mask(name, 64, 20, (32, 32), 0.3)) > 127
             for name in silhouettes.CLASSES]  # fmt: skip
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).mean() > 0.02, (
                silhouettes.CLASSES[i],
                silhouettes.CLASSES[j],
            )


def test_silhouette_variants_subset_classes_and_reject_bad_settings():
    import numpy as np

    from pretrain.data import silhouettes

    default = list(silhouettes.samples(12, seed=4))
    explicit = list(silhouettes.samples(12, seed=4, variant=silhouettes.Variant()))
    assert all(np.array_equal(np.asarray(a[-1]), np.asarray(b[-1]))
               for a, b in zip(default, explicit))  # fmt: skip
    easy = silhouettes.Variant(classes=4, radius=(0.3, 0.4), max_angle=0.0)
    rung = list(silhouettes.samples_with_background(12, seed=4, variant=easy))
    assert [label for _, label, _, _ in rung] == [i % 4 for i in range(12)]
    # A different variant draws a different set from the same seed.
    assert not all(
        np.array_equal(np.asarray(a[-1]), np.asarray(b[-1])) for a, b in zip(default, rung)
    )
    for bad, message in [({"classes": 1}, "classes"), ({"classes": 11}, "classes"),
                         ({"radius": (0.3, 0.2)}, "radius"), ({"radius": (0.0, 0.2)}, "radius"),
                         ({"radius": (0.2, 0.6)}, "radius")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            silhouettes.Variant(**bad)
