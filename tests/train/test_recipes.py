"""Every shipped recipe trains: its real crop geometry, heads, losses and parallel settings,
with the backbone made thin (model.embed_dim/depth/num_heads), for one step and a checkpoint."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_train_config
from pretrain.configtools import ConfigError

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs/pretrain").glob("*.yaml"))
# Thin, with the recipe's patch size, crops, registers, feed-forward and heads unchanged.
THIN = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


def test_every_recipe_is_found():
    names = {p.stem for p in RECIPES}
    assert {"vits14", "vitb14", "vitl14", "vitg14", "vit_test_cpu", "vit_tiny_cpu"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_its_crops_fit_the_patch(recipe):
    cfg = load_train_config(str(recipe), ["data.shards=x.tar"])
    patch = cfg.model.patch_size
    assert cfg.crops.global_crops_size % patch == 0
    assert cfg.crops.local_crops_number == 0 or cfg.crops.local_crops_size % patch == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_one_step_at_its_crop_geometry(recipe, shard_dir, helpers, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.train", "--config", str(recipe),
           f"data.shards={shard_dir}/shapes-*.tar", f"output_dir={out}", *THIN,
           "data.batch_size_per_rank=2", "data.num_workers=0", "data.shuffle_buffer=4",
           "train.steps=2", "train.stop_after=1", "train.log_every=1",
           "logging.tensorboard=false"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=helpers.run_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"{recipe.name}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    records = helpers.read_metrics(out)
    assert [r["step"] for r in records] == [1]
    assert all(math.isfinite(records[0][k]) for k in ("loss", "dino_loss", "ibot_loss"))
    assert (out / "checkpoints" / "step_0000001").is_dir()
    cfg = load_train_config(str(out / "config.yaml"), [])
    recipe_cfg = load_train_config(str(recipe), ["data.shards=x.tar"])
    assert cfg.crops == recipe_cfg.crops  # the geometry trained is the recipe's own
    assert (cfg.model.patch_size, cfg.head) == (recipe_cfg.model.patch_size, recipe_cfg.head)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["crops.local_crops_size=96"], "crops.local_crops_size=96 (try 84 or 98)"),
        (["crops.global_crops_size=220"], "crops.global_crops_size=220 (try 210 or 224)"),
        (["model.patch_size=16"], "crops.local_crops_size=98 (try 96 or 112)"),
    ],
)
def test_a_crop_size_off_the_patch_grid_is_refused_naming_it(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_train_config(str(REPO / "configs/pretrain/vits14.yaml"), ["data.shards=x", *overrides])
    assert named in str(err.value) and "model.patch_size" in str(err.value)


def test_local_crop_size_is_not_checked_without_local_crops():
    cfg = load_train_config(
        str(REPO / "configs/pretrain/vits14.yaml"),
        ["data.shards=x", "crops.local_crops_number=0", "crops.local_crops_size=96"],
    )
    assert cfg.crops.local_crops_number == 0


def test_training_with_the_photometric_part_on_the_device(shard_dir, helpers, tmp_path):
    """crops.photometric=device on a CPU: the batched augmentation runs in the step."""
    out = tmp_path / "run"
    proc = helpers.run_train(0, [f"data.shards={shard_dir}/shapes-*.tar", f"output_dir={out}",
                                 "crops.photometric=device", "train.steps=3", "train.log_every=1",
                                 "train.checkpoint_every=3", "data.num_workers=1",
                                 "logging.tensorboard=false"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = helpers.read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)


def test_fused_adamw_trains_like_foreach(shard_dir, helpers, tmp_path):
    """optim.implementation=fused (one kernel per group on CUDA) gives the foreach numbers."""
    losses = {}
    for impl in ("foreach", "fused"):
        out = tmp_path / impl
        proc = helpers.run_train(0, [f"data.shards={shard_dir}/shapes-*.tar", f"output_dir={out}",
                                     f"optim.implementation={impl}", "train.steps=4",
                                     "train.log_every=1", "train.checkpoint_every=4",
                                     "data.num_workers=0", "logging.tensorboard=false"])  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        losses[impl] = [r["loss"] for r in helpers.read_metrics(out)]
    assert len(losses["fused"]) == 4
    assert losses["fused"][0] == losses["foreach"][0]  # before any optimiser step
    # after: the same update up to float rounding (which a few DINO steps amplify)
    assert losses["fused"][1:] == pytest.approx(losses["foreach"][1:], rel=1e-2)
