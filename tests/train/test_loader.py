"""The WebDataset loader: shard resolution, determinism across resume, bad data counted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pretrain.config import load_train_config
from pretrain.data.loader import (
    ShardListError,
    ShardStream,
    _stream_shards,
    build_loader,
    build_pretrain_loader,
    build_transforms,
    resolve_shards,
)


def good(shard_dir: Path) -> list[str]:
    return sorted(str(p) for p in shard_dir.glob("shapes-*.tar"))


def test_resolve_glob_list_listfile_and_run_dirs(shard_dir, tmp_path):
    shards = good(shard_dir)
    assert resolve_shards(str(shard_dir / "shapes-*.tar")) == shards
    assert resolve_shards(str(shard_dir / "shapes-{000000..000001}.tar")) == shards[:2]
    assert resolve_shards(shards[:3]) == shards[:3]
    listing = tmp_path / "train.txt"
    listing.write_text("# my shards\n" + "\n".join(shards[1:]) + "\n")
    assert resolve_shards(str(listing)) == shards[1:]
    # A pipeline run directory: the shards its train_shards.txt names, relative to the run.
    crawl_run = tmp_path / "crawlrun"
    (crawl_run / "crawl").mkdir(parents=True)
    shutil.copy(shards[0], crawl_run / "crawl" / "00000.tar")
    (crawl_run / "train_shards.txt").write_text("crawl/00000.tar\n")
    assert resolve_shards(str(crawl_run)) == [str(crawl_run / "crawl" / "00000.tar")]
    (crawl_run / "curated" / "shards").mkdir(parents=True)
    shutil.copy(shards[1], crawl_run / "curated" / "shards" / "000000.tar")
    (crawl_run / "train_shards.txt").write_text("curated/shards/000000.tar\n")
    assert resolve_shards(str(crawl_run)) == [str(crawl_run / "curated/shards/000000.tar")]
    loose = tmp_path / "loose"  # any other folder: its tars
    loose.mkdir()
    shutil.copy(shards[2], loose / "a.tar")
    assert resolve_shards(str(loose)) == [str(loose / "a.tar")]


def test_missing_and_empty_shards_are_clear_errors(tmp_path):
    with pytest.raises(ShardListError, match="does not exist"):
        resolve_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(ShardListError, match="empty"):
        resolve_shards([])
    with pytest.raises(ShardListError, match="matches no shard"):
        resolve_shards(str(tmp_path / "*.tar"))
    (tmp_path / "emptyrun").mkdir()
    with pytest.raises(ShardListError, match="holds neither train_shards.txt"):
        resolve_shards(str(tmp_path / "emptyrun"))


def test_split_by_node_and_worker_is_disjoint():
    shards = [f"s{i}.tar" for i in range(8)]
    parts = [_stream_shards(shards, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(sum(parts, [])) == sorted(shards)
    assert all(len(p) == 2 for p in parts)


def _stream(shards, start, batch=4, streams=2, **kw):
    return ShardStream(
        shards, sample_transform=lambda img: torch.tensor(img.getpixel((32, 32)), dtype=torch.float32)
        + torch.rand(3), batch_collate=lambda xs: {"x": torch.stack(xs)}, batch_size=batch, seed=3,
        rank=0, world_size=1, n_streams=streams, start_batch=start, shuffle_buffer=16,
        reseed_every=3, **kw,
    )  # fmt: skip


def _take(dataset, workers, n):
    out = []
    for batch in build_loader(dataset, workers):
        out.append((batch["batch_index"], batch["x"]))
        if len(out) == n:
            return out


def test_resume_gives_the_same_batches(shard_dir):
    shards = good(shard_dir)
    full = _take(_stream(shards, 0), 2, 12)
    resumed = _take(_stream(shards, 7), 2, 5)
    assert [i for i, _ in full] == list(range(12))
    for (i, x), (j, y) in zip(full[7:], resumed):
        assert i == j and torch.equal(x, y)
    # The in-process path (num_workers=0) yields the same batches as worker processes.
    inproc = _take(_stream(shards, 7), 0, 5)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(resumed, inproc))


def test_corrupt_sample_and_truncated_tar_are_counted_and_skipped(shard_dir):
    shards = [str(shard_dir / "bad-sample.tar"), str(shard_dir / "truncated.tar")]
    dataset = _stream(shards, 0, batch=8, streams=1)
    batches = _take(dataset, 0, 6)
    assert len(batches) == 6 and all(x.shape == (8, 3) for _, x in batches)
    stats = dataset.stats[0].as_dict()
    assert stats["corrupt_samples"] >= 1 and stats["corrupt_tars"] >= 1


def _stream_totals(dataset, workers: int, n: int) -> dict[int, dict[str, int]]:
    """The latest running totals each stream reported, after n batches."""
    totals = {}
    for i, batch in enumerate(build_loader(dataset, workers)):
        totals[batch["stream"]] = batch["stream_stats"]
        if i + 1 == n:
            return totals


def test_each_worker_counts_its_own_corrupt_input(shard_dir):
    """Two workers, one reading the shard with a bad sample, the other the truncated tar: each
    batch carries its own stream's totals, and those equal the in-process run's."""
    shards = [str(shard_dir / "bad-sample.tar"), str(shard_dir / "truncated.tar")]
    with_workers = _stream_totals(_stream(shards, 0, batch=8, streams=2), 2, 8)
    in_process = _stream_totals(_stream(shards, 0, batch=8, streams=2), 0, 8)
    assert with_workers == in_process
    assert with_workers[0]["corrupt_samples"] >= 1 and with_workers[0]["corrupt_tars"] == 0
    assert with_workers[1]["corrupt_tars"] >= 1 and with_workers[1]["corrupt_samples"] == 0


def test_only_broken_shards_fail_loudly(tmp_path):
    broken = tmp_path / "garbage.tar"
    broken.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(RuntimeError, match="no readable sample"):
        _take(_stream([str(broken)], 0, streams=1), 0, 1)


def test_pretrain_loader_yields_multicrop_batches(shard_dir):
    cfg = load_train_config("configs/pretrain/vit_test_cpu.yaml", [f"data.shards={shard_dir}"])
    loader, n = build_pretrain_loader(cfg, rank=0, world_size=1, start_batch=0)
    batch = next(iter(loader))
    assert n == 6
    assert batch["collated_global_crops"].shape == (16, 3, 56, 56)
    assert batch["collated_local_crops"].shape == (16, 3, 28, 28)
    assert batch["collated_masks"].shape == (16, 16)


def test_colour_jitter_settings_reach_the_augmentation(helpers):
    from PIL import Image

    base = [f"data.shards={helpers.repo}", "crops.grayscale_prob=0", "crops.solarize_prob=0",
            "crops.blur_probs=[0,0,0]", "crops.color_jitter_prob=1"]  # fmt: skip
    image = Image.new("RGB", (56, 56), (200, 40, 40))

    def red_wins(jitter: str) -> list[bool]:
        cfg = load_train_config(str(helpers.config), [*base, f"crops.color_jitter={jitter}"])
        augment, _ = build_transforms(cfg)
        crops = [augment(image, seed=s)["global_crops"][0] for s in range(8)]
        return [bool(c.mean(dim=(1, 2)).argmax() == 0) for c in crops]

    assert all(red_wins("[0,0,0,0]"))
    assert not all(red_wins("[0,0,0,0.5]"))  # half the colour wheel: some crops turn
    bad = load_train_config(str(helpers.config), [*base, "crops.color_jitter=[0.4,0.4,0.2,0.7]"])
    with pytest.raises(ValueError, match="color_jitter"):
        build_transforms(bad)


def test_image_key_picks_the_configured_field(tmp_path):
    import io

    import webdataset as wds
    from PIL import Image

    from pretrain.data.loader import image_keys

    assert image_keys("JPG; .png;webp") == ("jpg", "png", "webp")
    with pytest.raises(ValueError, match="names no field"):
        image_keys(" ; ")

    def encoded(colour, fmt):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), colour).save(buf, format=fmt)
        return buf.getvalue()

    shard = tmp_path / "two-fields.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "jpg": encoded((250, 0, 0), "JPEG"),
                        "png": encoded((0, 0, 250), "PNG")})  # fmt: skip
    for keys, channel in ((("png", "jpg"), 2), (("jpg",), 0)):
        dataset = _stream([str(shard)], 0, batch=4, streams=1, image_keys=keys)
        ((_, x),) = _take(dataset, 0, 1)
        assert (x.argmax(dim=1) == channel).all(), keys


def test_shards_are_read_as_plain_bounded_tar_files(tmp_path, monkeypatch):
    """A compressed stream behind a .tar name is not decompressed, a member over the cap is
    skipped unread (its sample still comes, without that field), and a shard whose name looks
    like a WebDataset URL (`pipe:...`) is read as the file it is, never run."""
    import gzip
    import io
    import tarfile

    from pretrain.data.tars import tar_samples

    small, big = b"x" * 100, b"y" * 5000
    members = [("a.jpg", small), ("a.cls", b"1"), ("b.jpg", big), ("b.cls", b"2"),
               ("sub/c.JPG", small), ("__meta__.json", b"{}")]  # fmt: skip
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(tar_samples(str(plain), max_member_bytes=1000))
    assert [s["__key__"] for s in samples] == ["a", "b", "sub/c"]
    assert samples[0] == {"__key__": "a", "__url__": str(plain), "jpg": small, "cls": b"1"}
    assert samples[1] == {"__key__": "b", "__url__": str(plain), "cls": b"2"}  # jpg over the cap
    assert samples[2]["jpg"] == small  # field names lowercased, as WebDataset does

    disguised = tmp_path / "gz.tar"
    disguised.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(tarfile.ReadError):
        list(tar_samples(str(disguised)))

    monkeypatch.chdir(tmp_path)
    odd = "pipe:touch ran;.tar"
    (tmp_path / odd).write_bytes(plain.read_bytes())
    assert len(list(tar_samples(odd))) == 3
    assert not (tmp_path / "ran").exists()


def test_decode_refuses_bombs_and_formats_a_sample_may_not_hold():
    import io

    from PIL import Image

    from pretrain.data.loader import decode_image

    def encoded(img, fmt):
        out = io.BytesIO()
        img.save(out, format=fmt)
        return out.getvalue()

    assert decode_image(encoded(Image.new("RGB", (9, 7), (1, 2, 3)), "PNG")).size == (9, 7)
    assert decode_image(encoded(Image.new("RGB", (9, 7)), "JPEG")).mode == "RGB"
    bomb = encoded(Image.new("1", (12000, 12000)), "PNG")  # 144 Mpx in a few kB
    with pytest.raises(ValueError, match="12000x12000 image over"):
        decode_image(bomb)
    with pytest.raises(OSError):  # Pillow reads GIF, but a training sample is JPEG/PNG/WebP
        decode_image(encoded(Image.new("RGB", (9, 7)), "GIF"))


def _first_batches(cfg, device_type: str, n: int) -> list[dict]:
    loader, _ = build_pretrain_loader(
        cfg, rank=0, world_size=1, start_batch=0, device_type=device_type
    )
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def test_loader_hands_over_uint8_crops_and_the_device_part_when_asked(shard_dir, helpers):
    from pretrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
    from pretrain.data.photometric import N_PARAMS, batch_to_device

    base = [f"data.shards={shard_dir}/shapes-*.tar", "data.num_workers=0"]
    on_loader = load_train_config(str(helpers.config), [*base, "crops.photometric=auto"])
    on_device = load_train_config(str(helpers.config), [*base, "crops.photometric=device"])
    b, n_local = on_loader.data.batch_size_per_rank, on_loader.crops.local_crops_number
    plain = _first_batches(on_loader, "cpu", 2)  # auto on a CPU: the loader does it all
    deferred = _first_batches(on_device, "cpu", 2)
    again = _first_batches(on_device, "cpu", 2)
    for batch in plain:
        assert batch["collated_global_crops"].dtype == torch.uint8 and "global_params" not in batch
    for batch, same in zip(deferred, again):  # the drawn parameters are part of the exact stream
        assert batch["collated_global_crops"].dtype == torch.uint8
        assert batch["global_params"].shape == (2 * b, N_PARAMS)
        assert batch["local_params"].shape == (n_local * b, N_PARAMS)
        assert torch.equal(batch["global_params"], same["global_params"])
        assert torch.equal(batch["collated_local_crops"], same["collated_local_crops"])
        ready = batch_to_device(batch, torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD)
        size = on_device.crops.global_crops_size
        assert ready["collated_global_crops"].shape == (2 * b, 3, size, size)
        assert ready["collated_global_crops"].dtype == torch.float32


def test_a_bad_photometric_setting_is_refused(helpers):
    from pretrain.configtools import ConfigError

    with pytest.raises(ConfigError, match="crops.photometric"):
        load_train_config(str(helpers.config), ["data.shards=x", "crops.photometric=gpu"])
