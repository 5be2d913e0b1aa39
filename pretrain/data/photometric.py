"""DINOv2's photometric augmentation for a whole batch of crops at once, on the training device.

With `crops.photometric=device` the loader's CPU work per crop is the random resized crop and
the flip, on uint8; it also draws every crop's photometric parameters (`draw_params`, from the
batch's seeded torch generator, so the stream stays exact on resume). `apply_photometric` then
runs colour jitter (brightness, contrast, saturation, hue, in each crop's own random order, as
torchvision's ColorJitter does), grayscale, Gaussian blur (kernel 9), solarize and the ImageNet
normalisation on the batch: a few dozen batched tensor ops instead of ~15 small ones per crop
in the loader. The distributions are those of `DataAugmentationDINO`; the values differ from
its CPU path only by rounding (it rounds to uint8 after every step, this does not).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

# Columns of a crop's parameter row.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
ORDER = slice(4, 8)  # the four jitter operations' order (a permutation of 0..3)
GRAYSCALE, BLUR, SIGMA, SOLARIZE = 8, 9, 10, 11
N_PARAMS = 12
BLUR_KERNEL = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255  # torchvision's RandomSolarize(threshold=128) on uint8 pixels
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def draw_params(
    *,
    color_jitter: Sequence[float],
    color_jitter_prob: float,
    grayscale_prob: float,
    blur_prob: float,
    solarize_prob: float,
) -> Tensor:
    """One crop's parameters [N_PARAMS], drawn from torch's global generator."""
    row = torch.zeros(N_PARAMS)
    row[[BRIGHTNESS, CONTRAST, SATURATION]] = 1.0
    row[ORDER] = torch.arange(4, dtype=torch.float32)
    if torch.rand(()) < color_jitter_prob:
        for column, strength in zip((BRIGHTNESS, CONTRAST, SATURATION), color_jitter[:3]):
            low, high = max(0.0, 1.0 - strength), 1.0 + strength
            row[column] = low + (high - low) * torch.rand(())
        row[HUE] = (2 * torch.rand(()) - 1) * color_jitter[3]
        row[ORDER] = torch.randperm(4).float()
    row[GRAYSCALE] = float(torch.rand(()) < grayscale_prob)
    row[BLUR] = float(torch.rand(()) < blur_prob)
    row[SIGMA] = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(())
    row[SOLARIZE] = float(torch.rand(()) < solarize_prob)
    return row


def _column(params: Tensor, column: int) -> Tensor:
    return params[:, column].reshape(-1, 1, 1, 1)  # [N, 1, 1, 1]: one value per crop


def grayscale(x: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    return (ratio * x + (1 - ratio) * other).clamp(0.0, 1.0)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = x.unbind(dim=1)
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = chroma.clamp(min=1e-12)
    hue = torch.where(
        value == r,
        (g - b) / safe,
        torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    return torch.stack(((hue / 6.0) % 1.0, saturation, value), dim=1)


def _by_sector(sector: Tensor, choices: Sequence[Tensor]) -> Tensor:
    out = choices[5]
    for index in range(4, -1, -1):
        out = torch.where(sector == index, choices[index], out)
    return out


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of rgb_to_hsv: the hexcone model, sector by sector."""
    hue, saturation, value = x.unbind(dim=1)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6  # [N, H, W] in 0..5
    p = value * (1 - saturation)
    q = value * (1 - saturation * frac)
    t = value * (1 - saturation * (1 - frac))
    red = _by_sector(sector, (value, q, p, p, t, value))
    green = _by_sector(sector, (t, value, value, q, p, p))
    blue = _by_sector(sector, (p, p, t, value, value, q))
    return torch.stack((red, green, blue), dim=1)


def _jitter_op(x: Tensor, op: int, params: Tensor) -> Tensor:
    if op == BRIGHTNESS:
        return (x * _column(params, BRIGHTNESS)).clamp(0.0, 1.0)
    if op == CONTRAST:
        mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
        return _blend(x, mean, _column(params, CONTRAST))
    if op == SATURATION:
        return _blend(x, grayscale(x), _column(params, SATURATION))
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, :1] + _column(params, HUE)) % 1.0
    return hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), dim=1))


def color_jitter(x: Tensor, params: Tensor) -> Tensor:
    """Each crop's four jitter operations in its own order. Every operation is computed for
    every crop and the crop's own is selected (torch.where): no data-dependent indexing, which
    would make the host wait for the device."""
    order = params[:, ORDER].long()  # [N, 4]
    for slot in range(4):
        chosen = order[:, slot].reshape(-1, 1, 1, 1)
        out = x
        for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
            out = torch.where(chosen == op, _jitter_op(x, op, params), out)
        x = out
    return x


def gaussian_blur(x: Tensor, params: Tensor) -> Tensor:
    """Separable Gaussian blur, kernel 9, each crop with its own sigma (reflect padding, as
    torchvision); crops whose blur flag is 0 get a unit impulse, i.e. stay unchanged."""
    n, channels, height, width = x.shape
    half = BLUR_KERNEL // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)  # [9]
    sigma = params[:, SIGMA].to(x.dtype).reshape(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [N, 9]
    impulse = (offsets == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(params[:, BLUR].reshape(-1, 1) > 0, kernel, impulse)
    weight = kernel.repeat_interleave(channels, dim=0)  # [N*C, 9]: one filter per channel
    planes = F.pad(x.reshape(1, n * channels, height, width), (half,) * 4, mode="reflect")
    planes = F.conv2d(planes, weight.reshape(-1, 1, 1, BLUR_KERNEL), groups=n * channels)
    planes = F.conv2d(planes, weight.reshape(-1, 1, BLUR_KERNEL, 1), groups=n * channels)
    return planes.reshape(n, channels, height, width)


def apply_photometric(
    crops: Tensor, params: Tensor, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """uint8 crops [N, 3, H, W] and their parameters [N, N_PARAMS] -> normalised float32."""
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(
            f"expected uint8 crops [N, 3, H, W], got {crops.dtype} {tuple(crops.shape)}"
        )
    if tuple(params.shape) != (crops.shape[0], N_PARAMS):
        raise ValueError(
            f"expected parameters [{crops.shape[0]}, {N_PARAMS}], got {tuple(params.shape)}"
        )
    if crops.shape[0] == 0:
        return crops.float()
    params = params.to(crops.device, torch.float32)
    x = to_unit_range(crops)
    x = color_jitter(x, params)
    x = torch.where(_column(params, GRAYSCALE) > 0, grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, params)
    flip = (_column(params, SOLARIZE) > 0) & (x >= SOLARIZE_THRESHOLD)
    x = torch.where(flip, 1.0 - x, x)
    return normalize(x, mean, std)


@functools.lru_cache(maxsize=16)
def _channel_constants(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Tensor, Tensor]:
    # Copied to the device once, not every step (a copy from the host waits for the stream).
    return (
        torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1).to(device),
        torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1).to(device),
    )


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel, x float32 in [0, 1], as torchvision's Normalize computes it."""
    mean_t, std_t = _channel_constants(x.device, tuple(mean), tuple(std))
    return x.sub(mean_t).div_(std_t)


def to_unit_range(crops: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1], the very operations of torchvision's ToDtype(scale=True), so
    that normalising on the device gives the bits the loader used to produce."""
    return crops.to(torch.float32).mul_(1.0 / 255)


# Batch entries the training step reads on the host: copying them over and reading them back
# would make the host wait for the device (n_masked_patches sizes the iBOT Sinkhorn slice).
HOST_KEYS = ("n_masked_patches",)


def batch_to_device(
    batch: dict, device: torch.device, mean: Sequence[float], std: Sequence[float]
) -> dict:
    """A loader batch ready for the step on `device`: tensors copied (asynchronously from
    pinned memory), uint8 crops normalised there, and where the loader left the photometric
    part to the device (`*_params` present), that part applied first."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and key not in HOST_KEYS:
            value = value.to(device, non_blocking=True)
        out[key] = value
    for kind in ("global", "local"):
        key = f"collated_{kind}_crops"
        crops = out.get(key)
        if crops is None or crops.dtype != torch.uint8:
            continue  # float crops come normalised already
        params = out.pop(f"{kind}_params", None)
        if params is not None:
            out[key] = apply_photometric(crops, params, mean, std)
        else:
            out[key] = normalize(to_unit_range(crops), mean, std)
    return out
