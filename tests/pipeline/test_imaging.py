"""Resize modes, draft decoding, pHash."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.config import CrawlConfig
from pipeline.imaging import ImageError, hamming, phash, process_image


def _jpeg(w: int, h: int) -> bytes:
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.parametrize(
    "mode, source, expected",
    [
        ("no", (640, 480), (640, 480)),
        ("keep_ratio", (640, 480), (341, 256)),
        ("keep_ratio", (100, 200), (256, 512)),  # img2dataset upscales too
        ("keep_ratio_largest", (640, 480), (256, 192)),
        ("center_crop", (640, 480), (256, 256)),
        ("center_crop", (300, 900), (256, 256)),
        ("border", (640, 480), (256, 256)),
        ("border", (100, 400), (256, 256)),
    ],
)
def test_resize_mode_output_sizes(mode, source, expected):
    out = process_image(_jpeg(*source), CrawlConfig(resize_mode=mode, image_size=256))
    assert (out.width, out.height) == expected
    assert (out.original_width, out.original_height) == source
    assert Image.open(io.BytesIO(out.jpeg)).size == expected


def test_border_pads_with_black():
    out = process_image(_jpeg(100, 400), CrawlConfig(resize_mode="border", image_size=256))
    img = Image.open(io.BytesIO(out.jpeg))
    assert max(img.getpixel((2, 128))) < 10  # left border
    assert img.getpixel((128, 128)) != (0, 0, 0)


def test_min_size_and_bomb_guards():
    with pytest.raises(ImageError) as exc:
        process_image(_jpeg(100, 80), CrawlConfig(min_size=128))
    assert exc.value.kind == "too_small"
    with pytest.raises(ImageError) as exc:
        process_image(_jpeg(500, 500), CrawlConfig(max_pixels=500 * 499))
    assert exc.value.kind == "decompression_bomb"


def test_non_rgb_inputs_become_rgb():
    for mode in ("L", "RGBA", "P", "CMYK"):
        buf = io.BytesIO()
        fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
        Image.new(mode, (300, 200)).save(buf, format=fmt)
        out = process_image(buf.getvalue(), CrawlConfig(image_size=64))
        assert Image.open(io.BytesIO(out.jpeg)).mode == "RGB"


def test_phash_is_stable_under_rescale_and_differs_between_pictures(small_web):
    from pipeline.simweb import load_photos

    a, b = load_photos()[:2]
    assert hamming(phash(a), phash(a.resize((a.width // 2, a.height // 2)))) <= 4
    assert hamming(phash(a), phash(b)) > 10
    assert 0 <= phash(a) < 2**64


def test_jpeg_encoding_outside_the_gil_gives_the_same_bytes():
    """``encode_jpeg`` (a per-thread memfd on Linux, so Pillow releases the GIL) gives exactly
    what Pillow writes into memory, from many threads at once and for images of falling size
    (the scratch file is emptied between them)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.imaging import encode_jpeg

    def reference(img: Image.Image, quality: int) -> bytes:
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        return out.getvalue()

    images = [Image.open(io.BytesIO(_jpeg(w, w // 2 + 7))) for w in (900, 40, 333, 8, 600)]
    images = [img.convert("RGB").rotate(i * 17) for i, img in enumerate(images)]
    # A copy per job: Pillow keeps save()'s options on the image object itself.
    work = [(img.copy(), q) for img in images for q in (60, 95) for _ in range(8)]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda job: encode_jpeg(*job), work))
    assert got == [reference(img, q) for img, q in work]
    assert len(set(got)) == len(images) * 2  # the cases differ from one another
