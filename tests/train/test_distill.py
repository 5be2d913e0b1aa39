"""Distillation: a frozen teacher of another size gives the targets (DINO/iBOT from a run's
heads, or CLS + patch features from a backbone file); bad teachers are clear errors."""

from __future__ import annotations

import pytest

from pretrain.config import load_train_config
from pretrain.distill import read_teacher
from pretrain.pretrained import PretrainedError


@pytest.fixture(scope="module")
def teacher_run(shard_dir, helpers, tmp_path_factory):
    """A vit_small teacher (the student is vit_test: another size), 6 steps."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    proc = helpers.run_train(0, [f"data.shards={shard_dir}/shapes-*.tar", f"output_dir={out}",
                                 "model.arch=vit_small", "train.steps=6", "data.num_workers=0",
                                 "logging.tensorboard=false"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _distill(helpers, shard_dir, out, *extra):
    proc = helpers.run_train(0, [f"data.shards={shard_dir}/shapes-*.tar", f"output_dir={out}",
                                 "train.log_every=1", "data.num_workers=1",
                                 "logging.tensorboard=false", *extra])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return helpers.read_metrics(out)


def test_feature_distillation_from_a_backbone_file_learns_the_teachers_tokens(
    teacher_run, shard_dir, helpers, tmp_path
):
    records = _distill(helpers, shard_dir, tmp_path / "s", "train.steps=24",
                       f"distill.teacher={teacher_run}/teacher_backbone.safetensors")  # fmt: skip
    losses = [r["loss"] for r in records]
    assert records[0]["koleo_loss"] == 0.0  # features mode: cosine terms only
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4  # the distance more than halves


def test_dino_distillation_takes_the_frozen_teachers_targets(
    teacher_run, shard_dir, helpers, tmp_path
):
    common = ["train.steps=2", "train.checkpoint_every=2"]
    plain = _distill(helpers, shard_dir, tmp_path / "plain", *common)
    distilled = _distill(
        helpers, shard_dir, tmp_path / "d", *common, f"distill.teacher={teacher_run}"
    )
    # same student, same batch, other targets: the first step's DINO loss differs
    assert distilled[0]["dino_loss"] != pytest.approx(plain[0]["dino_loss"], rel=1e-3)
    cfg = load_train_config(
        str(helpers.config), ["data.shards=x", f"distill.teacher={teacher_run}"]
    )
    teacher = read_teacher(cfg)
    assert teacher.mode == "dino" and teacher.cfg.model.arch == "vit_small" and teacher.width == 384


def test_bad_teachers_are_clear_errors(teacher_run, helpers, tmp_path):
    def cfg(*extra):
        return load_train_config(str(helpers.config), ["data.shards=x", *extra])

    with pytest.raises(PretrainedError, match="no such file"):
        read_teacher(cfg(f"distill.teacher={tmp_path}/none"))
    with pytest.raises(PretrainedError, match="head.out_dim: run 256, this config 512"):
        read_teacher(cfg(f"distill.teacher={teacher_run}", "head.out_dim=512"))
    with pytest.raises(PretrainedError, match="patch 14, the student's 8"):
        read_teacher(cfg(f"distill.teacher={teacher_run}", "model.patch_size=8",
                         "crops.global_crops_size=56", "crops.local_crops_size=32"))  # fmt: skip
    with pytest.raises(PretrainedError, match="needs a run directory"):
        read_teacher(cfg(f"distill.teacher={teacher_run}/teacher_backbone.safetensors",
                         "distill.mode=dino"))  # fmt: skip
