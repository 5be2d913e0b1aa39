"""A simulated web for tests, the demo and the benchmark, served from 127.0.0.1.

``build_web`` makes images from the real photographs bundled with scikit-image (random crops,
sizes 300-1600 px, colour changes) and plants exact duplicates (same bytes, another URL) and
near duplicates (re-encoded, slightly rescaled copies whose pHash stays within the threshold).
``ImageServer`` serves them from memory with a threaded HTTP/1.1 server, plus fault endpoints:

    /fault/404  /fault/500-then-ok/<id>  /fault/slow  /fault/truncated.jpg  /fault/html
    /fault/empty  /fault/bomb.png  /fault/loop-a  /fault/big  /fault/robots  /fault/redirect
    /fault/drip (bytes trickle in: each read is quick, the whole body is not)
    /fault/404-drip (the same for a 404's body)
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from pipeline.config import CrawlConfig
from pipeline.imaging import process_image

PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "horse", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "retina", "rocket", "text", "brick", "grass",
          "gravel", "clock", "colorwheel", "logo", "microaneurysms")  # fmt: skip
FAULTS = ("404", "500-then-ok/1", "slow", "truncated.jpg", "html", "empty", "bomb.png",
          "loop-a", "big", "robots", "redirect")  # fmt: skip


def load_photos() -> list[Image.Image]:
    """The scikit-image photographs that ship inside its wheel (no download), as RGB."""
    return [photo for _, photo in load_named_photos()]


def load_named_photos() -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for each scikit-image photograph that loads without a download."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # some need a download: skip them
            continue
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(np.ptp(array), 1e-9)).astype(np.uint8)
        photos.append((name, Image.fromarray(array).convert("RGB")))
    return photos


@dataclass
class SimWeb:
    images: dict[str, bytes]  # path -> JPEG bytes
    exact_duplicates: dict[str, str] = field(default_factory=dict)  # copy path -> original path
    near_duplicates: dict[str, str] = field(default_factory=dict)
    # copies that pHash need not catch (cropped, colour-shifted, rescaled, re-encoded): the
    # semantic dedup's planted groups
    semantic_duplicates: dict[str, str] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)  # paths that fail (404)
    # path -> name of the photograph it was made from: a label for evaluating a backbone
    sources: dict[str, str] = field(default_factory=dict)

    def paths(self) -> list[str]:
        return sorted(self.images) + self.broken


def _random_image(photo: Image.Image, rng: random.Random) -> Image.Image:
    w, h = photo.size
    cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = photo.crop((left, top, left + cw, top + ch))
    side = rng.randint(300, 1600)
    scale = side / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.7))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def photo_crop_jpeg(photo: Image.Image, rng: random.Random, quality: int = 90) -> bytes:
    """One random crop of a photograph as the web's images are made (size, colour, mirror)."""
    return _jpeg(_random_image(photo, rng), quality)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def random_scene(rng: random.Random) -> Image.Image:
    """A generated picture no other call repeats: a two-colour gradient at a random angle, 4-8
    filled shapes (ellipses, rectangles, polygons) of random colours, sizes and places, pixel
    noise; 320-640 px. Two scenes share no content, unlike two crops of one photograph: the
    "distinct images" of a copy-detection check."""
    w, h = rng.randint(320, 640), rng.randint(320, 640)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 3
    c0, c1 = (np.array([rng.randint(0, 255) for _ in range(3)], np.float64) for _ in range(2))
    array = c0 + (c1 - c0) * t[..., None]
    img = Image.fromarray(array.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 8)):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.05, 0.3) * w, rng.uniform(0.05, 0.3) * h
        kind = rng.choice(("ellipse", "rectangle", "polygon"))
        if kind == "polygon":
            points = [(cx + rx * np.cos(a), cy + ry * np.sin(a))
                      for a in sorted(rng.uniform(0, 2 * np.pi) for _ in range(rng.randint(3, 7)))]  # fmt: skip
            draw.polygon(points, fill=colour)
        else:
            getattr(draw, kind)((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (h, w, 3))
    return Image.fromarray((np.asarray(img, np.float64) + noise).clip(0, 255).astype(np.uint8))


def build_web(n_images: int, seed: int = 0, n_exact: int = 0, n_near: int = 0, n_broken: int = 0,
              crawl: CrawlConfig | None = None, min_distance: int = 12,
              n_semantic: int = 0, scenes: bool = False) -> SimWeb:  # fmt: skip
    """Distinct images (pHash at least ``min_distance`` bits apart after the crawl's resize),
    plus planted duplicates and broken URLs. ``n_semantic`` originals (from the middle of the
    list) get two semantic copies each: one cropped and colour-shifted, one rescaled and
    re-encoded at low quality, both mirrored or not alike. The images are random crops of the
    bundled photographs, or with ``scenes`` generated pictures (``random_scene``, source
    "scene")."""
    crawl = crawl or CrawlConfig()
    rng = random.Random(seed)
    photos = [("scene", None)] if scenes else load_named_photos()
    images: dict[str, bytes] = {}
    sources: dict[str, str] = {}
    hashes: list[int] = []
    while len(images) < n_images:
        name, photo = rng.choice(photos)
        picture = random_scene(rng) if scenes else _random_image(photo, rng)
        data = _jpeg(picture, rng.randint(80, 95))
        h = process_image(data, crawl).phash
        if hashes and _min_hamming(h, hashes) < min_distance:
            continue  # too close to one already made: it would be an accidental near duplicate
        hashes.append(h)
        path = f"img/{len(images):06d}.jpg"
        images[path], sources[path] = data, name
    web = SimWeb(images, sources=sources)
    originals = sorted(images)
    for i in range(n_exact):
        web.exact_duplicates[f"img/exact-{i:04d}.jpg"] = originals[i % len(originals)]
    for i in range(n_near):
        original = originals[-1 - (i % len(originals))]
        web.near_duplicates[f"img/near-{i:04d}.jpg"] = original
    middle = len(originals) // 2
    for i in range(n_semantic):
        original = originals[(middle + i) % len(originals)]
        for variant in range(2):
            copy = f"img/semantic-{i:04d}-{variant}.jpg"
            web.semantic_duplicates[copy] = original
            images[copy] = semantic_copy(images[original], variant, rng)
    planted = {**web.exact_duplicates, **web.near_duplicates, **web.semantic_duplicates}
    for copy, original in planted.items():
        sources[copy] = sources[original]
    for copy, original in web.exact_duplicates.items():
        images[copy] = images[original]
    for copy, original in web.near_duplicates.items():
        images[copy] = _near_copy(images[original], crawl)
    web.broken = [f"missing/{i:04d}.jpg" for i in range(n_broken)]
    return web


def semantic_copy(data: bytes, variant: int, rng: random.Random) -> bytes:
    """The same picture, edited as copies on the web are: variant 0 cropped by up to 8% per
    side and colour-shifted; variant 1 rescaled to 60% and re-encoded at quality 60."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if variant == 0:
        w, h = img.size
        box = [round(w * rng.uniform(0.02, 0.08)), round(h * rng.uniform(0.02, 0.08))]
        img = img.crop((box[0], box[1], w - round(w * rng.uniform(0.02, 0.08)),
                        h - round(h * rng.uniform(0.02, 0.08))))  # fmt: skip
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
        return _jpeg(img, 90)
    small = img.resize((round(img.width * 0.6), round(img.height * 0.6)), Image.Resampling.BILINEAR)
    return _jpeg(small, 60)


def _near_copy(data: bytes, crawl: CrawlConfig, threshold: int = 4) -> bytes:
    """Rescaled by 90% and re-encoded at another quality: new bytes, same picture. Checked to
    stay within the dedup threshold (else only re-encoded), so the planted set is exact."""
    img = Image.open(io.BytesIO(data))
    original = process_image(data, crawl).phash
    size = (round(img.width * 0.9), round(img.height * 0.9))
    smaller = img.resize(size, Image.Resampling.LANCZOS)
    for candidate in (_jpeg(smaller, 70), _jpeg(img, 75)):
        if (process_image(candidate, crawl).phash ^ original).bit_count() <= threshold:
            return candidate
    raise RuntimeError("could not make a near duplicate within the threshold")


def _min_hamming(h: int, hashes: list[int]) -> int:
    arr = np.array(hashes, dtype=np.uint64) ^ np.uint64(h)
    bits = np.unpackbits(arr.view(np.uint8)).reshape(len(hashes), 64).sum(axis=1)
    return int(bits.min())


def fault_bodies() -> dict[str, bytes]:
    """Bodies of the fault endpoints that need one."""
    good = _jpeg(Image.new("RGB", (400, 300), (200, 30, 30)), 90)
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 Mpx in ~20 kB
    return {"image": good, "bomb": bomb.getvalue(), "big": good + b"\0" * 3_000_000,
            "huge": good + b"\0" * 20_000_000}  # fmt: skip


class ImageServer:
    """Threaded HTTP server on 127.0.0.1 serving a SimWeb, with fault paths.

    By default HTTP/1.1 with keep-alive, images held in memory. ``http10=True`` answers
    HTTP/1.0 and closes every connection after one response, as most hosts of a crawl over
    millions of sites look to a crawler (per-host keep-alive almost never helps there);
    ``web_dir`` reads each image from disk per request instead of holding the web in memory.
    """

    def __init__(self, web: SimWeb | None = None, slow_s: float = 3.0, port: int = 0,
                 http10: bool = False, web_dir: Path | None = None) -> None:  # fmt: skip
        self.images = dict(web.images) if web else {}
        self.web_dir = web_dir
        self.faults = fault_bodies()
        self.slow_s = slow_s
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        attrs = {"site": self, "protocol_version": "HTTP/1.0" if http10 else "HTTP/1.1"}
        handler = type("Handler", (_Handler,), attrs)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    def image(self, path: str) -> bytes | None:
        if self.web_dir is None:
            return self.images.get(path)
        if not path.startswith("img/") or "/" in path[4:] or path.startswith("img/."):
            return None
        try:
            return (self.web_dir / path).read_bytes()
        except OSError:
            return None

    def count_hit(self, path: str) -> int:
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            return self.hits[path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle on, the body waits for the client's
    # delayed ACK (40 ms a request) and the server, not the crawler, sets the pace.
    disable_nagle_algorithm = True
    site: ImageServer

    def log_message(self, *args) -> None:  # keep test and bench output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.lstrip("/").split("?")[0]
        hits = self.site.count_hit(path)
        body = self.site.image(path)
        if body is not None:
            return self._send(200, body, "image/jpeg")
        if path.startswith("fault/"):
            return self._fault(path[len("fault/") :], hits)
        self._send(404, b"not found", "text/plain")

    def _fault(self, name: str, hits: int) -> None:
        faults = self.site.faults
        if name.startswith("500-then-ok"):
            return (
                self._send(500, b"oops", "text/plain")
                if hits == 1
                else self._send(200, faults["image"], "image/jpeg")
            )
        if name == "500":
            return self._send(500, b"server error", "text/plain")
        if name == "slow":
            time.sleep(self.site.slow_s)
            return self._send(200, faults["image"], "image/jpeg")
        if name == "truncated.jpg":
            return self._send(200, faults["image"][: len(faults["image"]) // 2], "image/jpeg")
        if name == "html":
            return self._send(200, b"<html><body>not an image</body></html>", "text/html")
        if name == "empty":
            return self._send(200, b"", "image/jpeg")
        if name == "bomb.png":
            return self._send(200, faults["bomb"], "image/png")
        if name in ("loop-a", "loop-b"):
            return self._send(
                302,
                b"",
                "text/plain",
                {"Location": "/fault/loop-" + ("b" if name == "loop-a" else "a")},
            )
        if name == "big":
            return self._send(200, faults["big"], "image/jpeg")
        if name == "huge":
            return self._send(200, faults["huge"], "image/jpeg")
        if name == "robots":
            return self._send(
                200, faults["image"], "image/jpeg", {"X-Robots-Tag": "otherbot: noai, noimageai"}
            )
        if name == "redirect":
            return self._send(302, b"", "text/plain", {"Location": "/fault/robots-free"})
        if name == "drip":
            return self._drip(200, faults["image"], "image/jpeg")
        if name == "404-drip":  # an error page that never ends: 1 MB at 320 bytes/s, no length
            return self._drip(404, b"not found " * 100_000, "text/html", declare_length=False)
        if name == "robots-free":
            return self._send(200, faults["image"], "image/jpeg")
        self._send(404, b"unknown fault", "text/plain")

    def _drip(self, status: int, body: bytes, ctype: str, declare_length: bool = True) -> None:
        """A few bytes at a time, each within any read timeout, the whole far too slowly.
        Without a declared length the body ends only when the connection closes."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if declare_length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.close_connection = True
            self.end_headers()
            for start in range(0, len(body), 64):
                self.wfile.write(body[start : start + 64])
                self.wfile.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the crawler hung up (byte cap, timeout): expected


def save_web(web: SimWeb, directory: Path) -> None:
    """Store a built web (images + planted.json) so a server process can load it."""
    (directory / "img").mkdir(parents=True, exist_ok=True)
    for path, data in web.images.items():
        (directory / path).write_bytes(data)
    planted = {"exact": web.exact_duplicates, "near": web.near_duplicates, "broken": web.broken}
    (directory / "planted.json").write_text(json.dumps(planted, indent=1))


def load_web(directory: Path) -> SimWeb:
    planted = json.loads((directory / "planted.json").read_text())
    images = {f"img/{p.name}": p.read_bytes() for p in sorted((directory / "img").iterdir())}
    return SimWeb(images, planted["exact"], planted["near"], planted["broken"])


def serve_main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.simweb --web-dir DIR --port-file F``: serve a saved web until killed
    (the benchmark runs the server in its own process so it does not share a GIL)."""
    import argparse

    parser = argparse.ArgumentParser(description=serve_main.__doc__.split("\n")[0])
    parser.add_argument("--web-dir", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--http10", action="store_true", help="HTTP/1.0: one connection a request")
    parser.add_argument("--from-disk", action="store_true", help="read each image per request")
    parser.add_argument("--slow-s", type=float, default=3.0,
                        help="how long /fault/slow waits before answering (a hanging host: more "
                             "than the crawler's read timeout)")  # fmt: skip
    args = parser.parse_args(argv)
    web = None if args.from_disk else load_web(args.web_dir)
    server = ImageServer(web, slow_s=args.slow_s, http10=args.http10,
                         web_dir=args.web_dir if args.from_disk else None)  # fmt: skip
    with server:
        args.port_file.write_text(str(server.httpd.server_address[1]))
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
