"""Bad input to the job: a clear error, never a hang and never a silent restart."""

from __future__ import annotations

import shutil

import pytest

from pretrain.checkpoint import CheckpointMismatchError, check_model_matches, check_run_config
from pretrain.configtools import ConfigError


def test_foreign_config_in_output_dir_is_refused(shard_dir, helpers, tmp_path):
    out = tmp_path / "run"
    common = [f"data.shards={shard_dir}", f"output_dir={out}", "data.num_workers=0",
              "logging.tensorboard=false"]  # fmt: skip
    ok = helpers.run_train(0, [*common, "train.steps=1", "train.checkpoint_every=1"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    # Allowed change (more steps): resumes. Another model: refused, naming the key.
    bad = helpers.run_train(0, [*common, "train.steps=2", "head.out_dim=512"])
    assert bad.returncode != 0
    assert "holds another run's config" in bad.stderr and "head.out_dim" in bad.stderr
    assert [r["step"] for r in helpers.read_metrics(out)] == [1]  # nothing was overwritten


def test_checkpoint_of_another_model_size_is_refused(shard_dir, helpers, tmp_path):
    src = tmp_path / "small"
    common = [f"data.shards={shard_dir}", "data.num_workers=0", "logging.tensorboard=false"]
    ok = helpers.run_train(0, [*common, f"output_dir={src}", "train.steps=1"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(src / "checkpoints", other / "checkpoints")  # checkpoints, no config
    bad = helpers.run_train(0, [*common, f"output_dir={other}", "model.arch=vit_small"])
    assert bad.returncode != 0
    assert "CheckpointMismatchError" in bad.stderr and "embed_dim" in bad.stderr


def test_missing_shards_and_misspelt_key_fail_fast(helpers, tmp_path):
    missing = helpers.run_train(
        0, [f"data.shards={tmp_path}/none-*.tar", f"output_dir={tmp_path}/r"]
    )
    assert missing.returncode != 0 and "matches no shard" in missing.stderr
    misspelt = helpers.run_train(0, ["data.shard=x", f"output_dir={tmp_path}/r"])
    assert misspelt.returncode != 0 and "data.shard" in misspelt.stderr


def test_config_and_model_checks_name_the_difference(tmp_path):
    saved = "model:\n  arch: vit_test\ntrain:\n  steps: 10\n"
    check_run_config(
        saved, {"model": {"arch": "vit_test"}, "train": {"steps": 99}}, ["train.steps"], tmp_path
    )
    with pytest.raises(ConfigError, match="model.arch: saved 'vit_test', now 'vit_small'"):
        check_run_config(
            saved, {"model": {"arch": "vit_small"}, "train": {"steps": 10}}, [], tmp_path
        )
    # A key newer than the saved config matches at its default, and only there.
    newer = {"model": {"arch": "vit_test"}, "train": {"steps": 10}, "crops": {"hue": 0.1}}
    check_run_config(saved, newer, [], tmp_path, defaults={"crops": {"hue": 0.1}})
    with pytest.raises(ConfigError, match="crops.hue: saved '<unset>', now 0.5"):
        newer["crops"]["hue"] = 0.5
        check_run_config(saved, newer, [], tmp_path, defaults={"crops": {"hue": 0.1}})
    with pytest.raises(CheckpointMismatchError, match="n_blocks: checkpoint 4 vs this run 12"):
        check_model_matches({"model": {"n_blocks": 4}}, {"n_blocks": 12}, tmp_path)


@pytest.mark.parametrize(
    "content, needle",
    [(b"{not json", "not a readable checkpoint meta.json"),
     (b"\xff\xfe", "not a readable checkpoint meta.json"),
     (b'["step", 3]', "an integer step"),
     (b'{"step": "3"}', "an integer step")],
)  # fmt: skip
def test_malformed_checkpoint_meta_names_its_file(content, needle, tmp_path):
    from pretrain.checkpoint import read_meta

    (tmp_path / "step_0000003").mkdir()
    (tmp_path / "step_0000003" / "meta.json").write_bytes(content)
    with pytest.raises(ValueError, match=needle) as info:
        read_meta(tmp_path / "step_0000003")
    assert str(tmp_path / "step_0000003" / "meta.json") in str(info.value)


def test_labelled_folder_skips_special_files_instead_of_hanging(tmp_path):
    """An eval folder from elsewhere: a FIFO named x.png would block a plain read for good and
    a symlink to /dev/zero read forever; each is a counted skip."""
    import os

    from pretrain.data.synthetic import write_shapes_folders
    from pretrain.eval import load_labelled

    write_shapes_folders(tmp_path / "f", 8, seed=1)  # 4 classes of 2 images
    os.mkfifo(tmp_path / "f" / "circle" / "fifo.png")
    os.symlink("/dev/zero", tmp_path / "f" / "square" / "zero.png")
    data = load_labelled(str(tmp_path / "f"))
    assert data.skipped == 2 and len(data.images) == 8
