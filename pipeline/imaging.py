"""Decode, verify, resize and re-encode one image; perceptual hash.

Resize modes follow img2dataset's definitions:
    no                  keep the original size
    keep_ratio          shorter side -> image_size, aspect kept
    keep_ratio_largest  longer side -> image_size, aspect kept
    center_crop         shorter side -> image_size, then a centred image_size square
    border              longer side -> image_size, then padded with black to a square
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline.config import CrawlConfig


class ImageError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ProcessedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    phash: int  # unsigned 64-bit


def target_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """Size of the resized image before any crop or border."""
    if mode == "no":
        return width, height
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    scale = size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def process_image(data: bytes, cfg: CrawlConfig) -> ProcessedImage:
    """Decode bytes into a verified, resized RGB JPEG; raise ImageError with a reason."""
    if not data:
        raise ImageError("empty_body", "empty response body")
    if data.lstrip()[:1] == b"<":
        raise ImageError("not_image", "body is HTML/XML, not an image")
    try:
        with warnings.catch_warnings():
            # Our own limit below (from the header, before decoding) is the guard; Pillow's
            # global one stays as it is for the rest of the process and only adds a warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > cfg.max_pixels:
                raise ImageError(
                    "decompression_bomb", f"{width}x{height} exceeds max_pixels={cfg.max_pixels}"
                )
            if min(width, height) < cfg.min_size:
                raise ImageError("too_small", f"{width}x{height} below min_size={cfg.min_size}")
            want = target_size(width, height, cfg.image_size, cfg.resize_mode)
            if img.format == "JPEG" and want[0] < width:
                # Decode at the smallest DCT scale still >= the target: a large speed-up.
                img.draft("RGB", want)
            img.load()
            img = _to_rgb(img)
            img = _resize(img, want, cfg.image_size, cfg.resize_mode)
            jpeg = encode_jpeg(img, cfg.jpeg_quality)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", str(exc)) from None
    except Exception as exc:  # Pillow raises many types for corrupt input
        raise ImageError(
            "decode_error", f"cannot decode image: {type(exc).__name__}: {exc}"
        ) from None
    return ProcessedImage(jpeg, img.width, img.height, width, height, phash(img))


_scratch = threading.local()


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """``img`` as JPEG bytes, encoded with the GIL released where the OS allows.

    Pillow holds the GIL while it encodes into a memory buffer but releases it while it encodes
    into a file descriptor, so on Linux each thread encodes into its own in-memory file
    (memfd) and reads the bytes back: a crawl task's other threads keep running meanwhile.
    The bytes are the same either way.
    """
    if not hasattr(os, "memfd_create"):
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        return out.getvalue()
    f = getattr(_scratch, "file", None)
    if f is None:
        f = _scratch.file = open(os.memfd_create("dinoforge-jpeg", os.MFD_CLOEXEC), "w+b", 0)
    try:
        img.save(f, format="JPEG", quality=quality)
        return os.pread(f.fileno(), f.tell(), 0)
    finally:
        f.seek(0)
        f.truncate()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _resize(img: Image.Image, want: tuple[int, int], size: int, mode: str) -> Image.Image:
    if mode == "no":
        return img
    if img.size != want:
        # Shrinking: a box filter is area averaging, what img2dataset uses (cv2.INTER_AREA), and
        # about twice as fast as bilinear in Pillow. Enlarging: Lanczos, as img2dataset does.
        shrinking = want[0] < img.width
        method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
        img = img.resize(want, method)
    if mode == "center_crop":
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif mode == "border":
        pad_w, pad_h = size - img.width, size - img.height
        border = (pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2)
        img = ImageOps.expand(img, border=border, fill=(0, 0, 0))
    return img


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash: low 8x8 frequencies of a 32x32 grey image vs their median."""
    # Shrink first, then drop colour: converting the 32x32 thumbnail is nearly free.
    grey = np.asarray(img.resize((32, 32), Image.Resampling.BOX).convert("L"), dtype=np.float64)
    freq = _DCT32 @ grey @ _DCT32.T  # (32, 32) 2-D DCT-II, unnormalised
    low = freq[:8, :8].flatten()  # (64,)
    middle = np.sort(low)[31:33]  # the median, without np.median's overhead (40 us a call)
    bits = low > (middle[0] + middle[1]) / 2
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
