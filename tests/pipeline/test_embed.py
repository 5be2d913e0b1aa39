"""The embed stage's functions without Ray: preprocessing as DINOv2's evaluation transform,
stored features equal to the model's own forward, row alignment, counted bad samples."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from pipeline.config import CrawlConfig, EmbedConfig
from pipeline.layout import RunLayout
from pipeline.shardio import TarSink, iter_tar_samples
from pipeline.stages.crawl import crawl_shard
from pipeline.stages.embed import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Embedder,
    EmbedInputError,
    embed_crawl_shard,
    embed_eval_set,
    embed_samples,
    eval_set_files,
    eval_set_samples,
    part_intact,
    preprocess,
    read_part,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vit_test_embedder.safetensors"


def _png(size, seed) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(EmbedConfig(checkpoint=str(FIXTURE), image_size=56, batch_size=8))


def test_preprocess_is_dinov2_eval_transform():
    """Short side to size / 0.875 (bicubic), centre crop: as torchvision's Resize + CenterCrop."""
    data = _png((120, 90), seed=0)
    ours = preprocess(data, 56)
    reference = v2.Compose(
        [v2.Resize(64, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(56)]
    )(Image.open(io.BytesIO(data)).convert("RGB"))
    assert ours.shape == (56, 56, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - np.asarray(reference).astype(int)).max() <= 1


def test_shard_embeddings_equal_the_models_forward(embedder, small_web, tmp_path):
    """Rows aligned with keys, duplicates not embedded, float16 within storage tolerance."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(small_web.images)[:20]:
        (folder / Path(path).name).write_bytes(small_web.images[path])

    files = sorted(str(p) for p in folder.iterdir())
    layout = RunLayout(tmp_path / "run")
    crawl_shard(pa.table({"url": files}), 0, layout.crawl_dir, CrawlConfig(shard_size=32), "folder")
    shard = layout.crawl_shard(0)
    samples = dict(iter_tar_samples(shard.tar))
    drop = set(sorted(samples)[:3])
    part = layout.embed_part("00000")
    marker = embed_crawl_shard(embedder, shard, drop, part, token="t0")
    feats, keys = read_part(part)
    assert keys == [k for k in samples if k not in drop]  # rows in tar order
    assert feats.dtype == np.float16 and feats.shape == (17, 64)
    assert marker["count"] == 17 and marker["failures"] == 0 and marker["token"] == "t0"
    images = torch.stack([torch.from_numpy(preprocess(samples[k]["jpg"], 56)) for k in keys])
    x = (
        images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    ) / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    with torch.no_grad():
        expected = F.normalize(embedder.model(x), dim=-1).numpy()
    np.testing.assert_allclose(feats.astype(np.float32), expected, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # The fixture's weights tell images apart (a random-init ViT would not).
    sims = feats.astype(np.float32) @ feats.astype(np.float32).T
    assert np.median(sims[np.triu_indices(len(keys), 1)]) < 0.9


def test_corrupt_sample_is_counted_not_fatal(embedder, tmp_path):
    good = [(f"k{i}", _png((80, 70), seed=i)) for i in range(5)]
    samples = good[:2] + [("broken", b"\xff\xd8\xff not a jpeg")] + good[2:]
    keys, feats, failures = embed_samples(embedder, samples)
    assert keys == ["k0", "k1", "k2", "k3", "k4"] and feats.shape == (5, 64)
    assert [k for k, _ in failures] == ["broken"] and "UnidentifiedImageError" in failures[0][1]
    # A crawl tar holding an undecodable member: recorded in the part's failures table.
    layout, shard = _crawl_shard(tmp_path, 3, samples, [k for k, _ in samples])
    part = layout.embed_part("00003")
    marker = embed_crawl_shard(embedder, shard, set(), part, token="x")
    assert marker["count"] == 5 and marker["failures"] == 1
    failed = pq.read_table(part.npy.with_name("00003.failures.parquet")).to_pylist()
    assert failed[0]["key"] == "broken"
    assert json.loads(part.done.read_text())["count"] == 5


def _crawl_shard(tmp_path, index: int, samples, successes, failed=()):
    """(layout, shard): a crawl shard on disk whose tar holds ``samples`` ((key, image bytes))
    and whose parquet lists ``successes`` and ``failed`` keys (the columns embed reads)."""
    layout = RunLayout(tmp_path)
    layout.crawl_dir.mkdir(parents=True, exist_ok=True)
    shard = layout.crawl_shard(index)
    sink = TarSink(shard.tar)
    for key, data in samples:
        sink.add(key, data, {})
    sink.commit()
    keys = list(successes) + list(failed)
    status = ["success"] * len(successes) + ["error"] * len(failed)
    pq.write_table(pa.table({"key": keys, "status": status}), shard.parquet)
    return layout, shard


def test_crawl_tar_losing_samples_counts_them(embedder, tmp_path):
    """A crawl tar that no longer holds what its parquet says crawled fine (a member gone, the
    tar cut short) embeds what it holds and records every missing success as a failure."""
    # k6 is a success in the parquet but not in the tar; f0 failed (never in a tar); k5 is a
    # dedup drop (not embedded, not a failure)
    images = [(f"k{i}", _png((80, 70), seed=i)) for i in range(6)]
    layout, shard = _crawl_shard(tmp_path, 0, images, [f"k{i}" for i in range(7)], ("f0",))
    part = layout.embed_part("00000")
    marker = embed_crawl_shard(embedder, shard, {"k5"}, part, token="x")
    assert marker["count"] == 5 and marker["failures"] == 1
    failed = pq.read_table(part.npy.with_name("00000.failures.parquet")).to_pylist()
    assert [(r["key"], r["error"]) for r in failed] == [("k6", "not in the crawl tar")]
    # The tar cut in the middle of the third sample's image: two embed, the rest are failures.
    data = shard.tar.read_bytes()
    third = data.index(b"k2.jpg")
    shard.tar.write_bytes(data[: third + 512 + 100])
    marker = embed_crawl_shard(embedder, shard, {"k5"}, part, token="x")
    failed = pq.read_table(part.npy.with_name("00000.failures.parquet")).to_pylist()
    assert marker["count"] == 2 and marker["failures"] == 4
    assert [r["key"] for r in failed] == ["k2", "k3", "k4", "k6"]
    assert all("crawl tar unreadable after 2 samples" in r["error"] for r in failed)
    # An I/O error (here: the tar gone) is not a property of the data: the shard's task fails
    # and writes no done marker, so the next run embeds it again.
    shard.tar.unlink()
    with pytest.raises(FileNotFoundError):
        embed_crawl_shard(embedder, shard, {"k5"}, part, token="x")
    assert not part.done.exists()


def test_a_part_whose_files_went_short_is_not_taken_as_done(embedder, tmp_path):
    """The resume check: a done marker counts only with its token and with features and keys
    of the rows it recorded; a truncated or missing .npy, or lost keys, mean re-embed."""
    import os

    images = [(f"k{i}", _png((80, 70), seed=i)) for i in range(4)]
    layout, shard = _crawl_shard(tmp_path, 0, images, [k for k, _ in images])
    part = layout.embed_part("00000")
    embed_crawl_shard(embedder, shard, set(), part, token="t1")
    assert part_intact(part, "t1") and not part_intact(part, "t2")
    good = part.npy.read_bytes()
    os.truncate(part.npy, len(good) - 64)  # half a row lost
    assert not part_intact(part, "t1")
    part.npy.unlink()
    assert not part_intact(part, "t1")
    part.npy.write_bytes(good)
    assert part_intact(part, "t1")
    pq.write_table(pa.table({"key": ["k0", "k1"]}), part.keys)  # keys of another size
    assert not part_intact(part, "t1")
    part.keys.unlink()
    assert not part_intact(part, "t1")
    part.done.write_text("[]")  # a marker that is not one: re-embed, not a crash
    assert not part_intact(part, "t1")
    part.done.write_text('{"token": "t1"}')
    assert not part_intact(part, "t1")


def test_eval_set_special_and_oversized_files_are_failures_not_hangs(embedder, tmp_path):
    """An evaluation set is a folder from elsewhere: a FIFO named as an image is not listed; a
    symlink to /dev/zero, a file that turns into a FIFO after the listing, or one over 64 MiB,
    is a recorded failure of its key; a FIFO named x.tar is not one of a set's tars."""
    import os

    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png((70, 70), seed=i))
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    items = eval_set_files(str(folder))
    assert [Path(p).name for p, _ in items] == ["0.png", "1.png", "2.png", "zero.jpg"]
    (folder / "1.png").unlink()
    os.mkfifo(folder / "1.png")
    with open(folder / "2.png", "r+b") as f:
        f.truncate(65 * 2**20)  # sparse: 65 MiB without writing them
    keys, feats, failures = embed_samples(embedder, eval_set_samples(items))
    assert [Path(k).name for k in keys] == ["0.png"] and feats.shape == (1, 64)
    errors = {Path(k).name: e for k, e in failures}
    assert "not a regular file" in errors["1.png"] and "cap" in errors["2.png"]
    assert "not a regular file" in errors["zero.jpg"]
    tars = tmp_path / "tars"
    tars.mkdir()
    sink = TarSink(tars / "a.tar")
    sink.add("k0", _png((70, 70), seed=0), {})
    sink.commit()
    os.mkfifo(tars / "b.tar")
    assert eval_set_files(str(tars / "*.tar")) == [(str(tars / "a.tar"), None)]


def test_cls_patch_mean_features(tmp_path):
    cfg = EmbedConfig(checkpoint=str(FIXTURE), image_size=56, features="cls_patch_mean")
    emb = Embedder(cfg)
    feats = emb(np.stack([preprocess(_png((70, 70), seed=s), 56) for s in range(3)]))
    assert feats.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_eval_set_errors(embedder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    part = RunLayout(tmp_path).embed_part("set00", eval_set=True)
    with pytest.raises(EmbedInputError, match="holds no images"):
        embed_eval_set(embedder, str(empty), part, "t")
    with pytest.raises(EmbedInputError, match="neither a folder nor a tar glob"):
        embed_eval_set(embedder, str(tmp_path / "missing"), part, "t")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(EmbedInputError, match="no image of"):
        embed_eval_set(embedder, str(bad), part, "t")


def test_bad_checkpoints_are_clear_errors(tmp_path):
    not_a_vit = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, not_a_vit)
    with pytest.raises((KeyError, ValueError), match="other.pth|cls_token"):
        Embedder(EmbedConfig(checkpoint=str(not_a_vit)))
    with pytest.raises(FileNotFoundError):
        Embedder(EmbedConfig(checkpoint=str(tmp_path / "nope.pth")))


def test_embed_identity_follows_the_weights_not_only_the_path(tmp_path):
    """A backbone retrained in place (same embed.checkpoint, new weights) must not reuse the
    old embeddings: the identity that every embed done marker is tokened with carries the
    weights' SHA-256."""
    import os
    import shutil

    from pipeline.config import PipelineConfig
    from pipeline.runner import embed_identity
    from pretrain.configtools import load_config
    from pretrain.models.loading import EXPORT_NAME, file_sha256

    run = tmp_path / "train"
    run.mkdir()
    weights = run / EXPORT_NAME
    shutil.copy(FIXTURE, weights)
    cfg = load_config(PipelineConfig, None, ["output_dir=x", f"embed.checkpoint={run}"])
    first = embed_identity(cfg)
    assert first["weights_sha256"] == file_sha256(FIXTURE)
    assert first["embed.checkpoint"] == str(run)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # "retrained": other bytes, same path
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))
    assert embed_identity(cfg)["weights_sha256"] != first["weights_sha256"]
