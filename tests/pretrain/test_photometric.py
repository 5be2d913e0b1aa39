"""The batched photometric augmentation (crops.photometric=device) against torchvision's own
per-image functions with the same parameters, its parameter distributions, and the uint8
hand-over: normalising on the device gives the very bits the loader used to produce."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pretrain.data import photometric as ph
from pretrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO

CPU = torch.device("cpu")
JITTER = dict(color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_prob=0.8, grayscale_prob=0.2)


def _reference(crop: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """One crop through torchvision's functional ops, in the order and with the values of row."""
    x = crop.float() / 255
    ops = {
        ph.BRIGHTNESS: lambda t: TF.adjust_brightness(t, float(row[ph.BRIGHTNESS])),
        ph.CONTRAST: lambda t: TF.adjust_contrast(t, float(row[ph.CONTRAST])),
        ph.SATURATION: lambda t: TF.adjust_saturation(t, float(row[ph.SATURATION])),
        ph.HUE: lambda t: TF.adjust_hue(t, float(row[ph.HUE])),
    }
    for op in row[ph.ORDER].long().tolist():
        x = ops[op](x)
    if row[ph.GRAYSCALE]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[ph.BLUR]:
        sigma = float(row[ph.SIGMA])
        x = TF.gaussian_blur(x, kernel_size=[9, 9], sigma=[sigma, sigma])
    if row[ph.SOLARIZE]:
        x = TF.solarize(x, threshold=128 / 255)
    return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _crops(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth colour fields plus noise: every jitter operation changes them visibly
    base = torch.rand(n, 3, 1, 1, generator=g) * 255
    ramp = torch.linspace(-60, 60, size).reshape(1, 1, 1, size)
    noise = torch.randn(n, 3, size, size, generator=g) * 20
    return (base + ramp + noise).clamp(0, 255).to(torch.uint8)


def test_batched_ops_equal_torchvision_per_crop():
    torch.manual_seed(0)
    crops = _crops(48, 20)
    rows = torch.stack([ph.draw_params(**JITTER, blur_prob=0.5, solarize_prob=0.5) for _ in crops])
    # every operation and every order position is exercised
    assert rows[:, ph.GRAYSCALE].any() and rows[:, ph.BLUR].any() and rows[:, ph.SOLARIZE].any()
    assert len({tuple(r[ph.ORDER].tolist()) for r in rows}) > 5
    got = ph.apply_photometric(crops, rows, IMAGENET_MEAN, IMAGENET_STD)
    want = torch.stack([_reference(c, r) for c, r in zip(crops, rows)])
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)


def test_hsv_round_trip_and_hue_shift_match_torchvision():
    x = _crops(8, 16, seed=1).float() / 255
    torch.testing.assert_close(ph.hsv_to_rgb(ph.rgb_to_hsv(x)), x, rtol=0, atol=1e-5)
    for hue in (-0.1, 0.05, 0.5):
        params = torch.zeros(len(x), ph.N_PARAMS)
        params[:, ph.HUE] = hue
        shifted = ph._jitter_op(x, ph.HUE, params)
        torch.testing.assert_close(shifted, TF.adjust_hue(x, hue), rtol=0, atol=1e-5)


def test_parameter_draws_follow_the_recipe_probabilities():
    torch.manual_seed(0)
    n = 4000
    rows = torch.stack(
        [ph.draw_params(**JITTER, blur_prob=0.1, solarize_prob=0.2) for _ in range(n)]
    )
    identity_order = (rows[:, ph.ORDER] == torch.arange(4.0)).all(dim=1)
    jittered = (rows[:, ph.BRIGHTNESS] != 1) | ~identity_order
    assert abs(jittered.float().mean() - 0.8) < 0.03
    assert abs(rows[:, ph.GRAYSCALE].mean() - 0.2) < 0.03
    assert abs(rows[:, ph.BLUR].mean() - 0.1) < 0.02
    assert abs(rows[:, ph.SOLARIZE].mean() - 0.2) < 0.03
    on = rows[jittered]
    assert on[:, ph.BRIGHTNESS].min() >= 0.6 and on[:, ph.BRIGHTNESS].max() <= 1.4
    assert on[:, ph.SATURATION].min() >= 0.8 and on[:, ph.SATURATION].max() <= 1.2
    assert on[:, ph.HUE].abs().max() <= 0.1 and on[:, ph.HUE].abs().max() > 0.09
    assert rows[:, ph.SIGMA].min() >= 0.1 and rows[:, ph.SIGMA].max() <= 2.0
    assert sorted(on[0, ph.ORDER].tolist()) == [0, 1, 2, 3]


def test_geometric_output_defers_the_photometric_part_with_each_crops_parameters(astronaut):
    aug = DataAugmentationDINO(
        global_crops_size=32, local_crops_size=16, local_crops_number=3, output="geometric"
    )
    out = aug(astronaut, seed=4)
    assert [c.dtype for c in out["global_crops"] + out["local_crops"]] == [torch.uint8] * 5
    assert len(out["global_params"]) == 2 and len(out["local_params"]) == 3
    # solarize is drawn for the second global crop only
    torch.manual_seed(0)
    draws = [aug(astronaut) for _ in range(60)]
    assert sum(float(d["global_params"][1][ph.SOLARIZE]) for d in draws) > 0
    assert all(d["global_params"][0][ph.SOLARIZE] == 0 for d in draws)
    assert all(p[ph.SOLARIZE] == 0 for d in draws for p in d["local_params"])
    # blur: always on global crop 1 (probability 1.0)
    assert all(d["global_params"][0][ph.BLUR] == 1 for d in draws)


def test_uint8_hand_over_normalises_to_the_loader_bits(astronaut):
    kwargs = dict(global_crops_size=48, local_crops_size=24, local_crops_number=2)
    before = DataAugmentationDINO(**kwargs)(astronaut, seed=9)
    after = DataAugmentationDINO(**kwargs, output="uint8")(astronaut, seed=9)
    for kind in ("global_crops", "local_crops"):
        batch = {f"collated_{kind}": torch.stack(after[kind])}
        ready = ph.batch_to_device(batch, CPU, IMAGENET_MEAN, IMAGENET_STD)[f"collated_{kind}"]
        assert torch.equal(ready, torch.stack(before[kind]).as_subclass(torch.Tensor))


def test_batch_to_device_applies_the_deferred_part_and_keeps_host_counts():
    torch.manual_seed(0)
    crops = _crops(4, 12)
    params = torch.stack(
        [ph.draw_params(**JITTER, blur_prob=1.0, solarize_prob=0.0) for _ in crops]
    )
    batch = {
        "collated_global_crops": crops,
        "global_params": params,
        "collated_local_crops": crops[:2, :, :8, :8].contiguous(),
        "local_params": params[:2],
        "n_masked_patches": torch.tensor([5]),
        "stream": 0,
    }
    ready = ph.batch_to_device(batch, CPU, IMAGENET_MEAN, IMAGENET_STD)
    assert "global_params" not in ready and "local_params" not in ready
    torch.testing.assert_close(
        ready["collated_global_crops"],
        ph.apply_photometric(crops, params, IMAGENET_MEAN, IMAGENET_STD),
    )
    assert ready["collated_local_crops"].shape == (2, 3, 8, 8)
    assert ready["n_masked_patches"] is batch["n_masked_patches"] and ready["stream"] == 0


def test_bad_crops_or_parameters_are_refused():
    with pytest.raises(ValueError, match="uint8 crops"):
        ph.apply_photometric(
            torch.zeros(2, 3, 4, 4), torch.zeros(2, ph.N_PARAMS), (0,) * 3, (1,) * 3
        )
    with pytest.raises(ValueError, match="parameters"):
        ph.apply_photometric(
            torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, 5), (0,) * 3, (1,) * 3
        )
    with pytest.raises(ValueError, match="output"):
        DataAugmentationDINO(output="fp16")
