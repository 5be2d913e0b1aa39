"""Config schema, recipes, schedules and parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.arch import SSLModel
from pretrain.config import load_train_config
from pretrain.configtools import ConfigError
from pretrain.optim import Schedules, apply_step_values, build_optimizer, param_groups, peak_lr


def cfg_for(name: str = "vit_test_cpu", *overrides: str):
    return load_train_config(f"configs/pretrain/{name}.yaml", ["data.shards=x", *overrides])


def test_recipes_hold_dinov2_values():
    s, l14, g14 = cfg_for("vits14"), cfg_for("vitl14"), cfg_for("vitg14")
    assert (s.optim.base_lr, s.optim.layerwise_decay, s.optim.momentum_teacher) == (
        0.004,
        0.9,
        0.992,
    )
    assert (s.crops.global_crops_size, s.crops.local_crops_number, s.head.out_dim) == (
        224,
        8,
        65536,
    )
    assert (s.optim.weight_decay, s.optim.weight_decay_end, s.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (l14.model.ffn_layer, l14.model.drop_path_rate, l14.optim.base_lr) == (
        "mlp",
        0.4,
        2e-4,
    )
    assert (l14.optim.warmup_epochs, l14.crops.local_crops_size) == (80, 98)
    assert (g14.head.out_dim, g14.head.bottleneck_dim, g14.loss.centering) == (
        131072,
        384,
        "sinkhorn_knopp",
    )
    assert cfg_for("vitb14").model.arch == "vit_base"
    # as released: a plain MLP up to ViT-L/14, fused SwiGLU for ViT-g/14 only
    assert (l14.model.arch, g14.model.arch, g14.model.ffn_layer) == (
        "vit_large",
        "vit_giant2",
        "swiglu",
    )


def test_misspelt_and_missing_keys_are_clear_errors():
    with pytest.raises(ConfigError, match="optim.bse_lr"):
        cfg_for("vit_test_cpu", "optim.bse_lr=0.1")
    with pytest.raises(ConfigError, match="data.shards is not set"):
        load_train_config("configs/pretrain/vit_test_cpu.yaml", [])
    with pytest.raises(ConfigError, match="loss.centering"):
        cfg_for("vit_test_cpu", "loss.centering=median")


def test_schedules_follow_the_recipe():
    cfg = cfg_for("vits14", "train.steps=1000", "train.iterations_per_epoch=10")
    sched = Schedules(cfg.optim, cfg.train, global_batch=256)
    peak = 0.004 * math.sqrt(256 / 1024)
    assert sched.peak_lr == pytest.approx(peak)
    assert sched.at(0).lr == 0.0
    assert sched.at(50).lr == pytest.approx(peak / 2)  # linear warm-up over 10 epochs = 100 steps
    assert sched.at(100).lr == pytest.approx(peak)
    assert sched.at(1000).lr == pytest.approx(1e-6)
    assert sched.at(0).wd == pytest.approx(0.04) and sched.at(1000).wd == pytest.approx(0.4)
    assert sched.at(500).wd == pytest.approx((0.04 + 0.4) / 2)
    assert sched.at(0).momentum == pytest.approx(0.992) and sched.at(
        1000
    ).momentum == pytest.approx(1.0)
    assert sched.at(0).teacher_temp == pytest.approx(0.04)
    assert sched.at(150).teacher_temp == pytest.approx(0.055)  # halfway through 30 epochs
    assert sched.at(300).teacher_temp == pytest.approx(0.07)
    assert sched.at(9).last_layer_lr == 0.0 and sched.at(10).last_layer_lr == sched.at(10).lr
    linear = cfg_for("vits14", "optim.scaling_rule=linear_wrt_1024")
    assert peak_lr(linear.optim, 2048) == pytest.approx(0.008)


def test_param_groups_decay_and_multipliers():
    cfg = cfg_for("vit_test_cpu", "optim.layerwise_decay=0.5")
    model = SSLModel(cfg, 0.0)
    n = model.backbone.n_blocks
    by_name = {}
    for group in param_groups(model, cfg.optim, n):
        ids = {id(p) for p in group["params"]}
        for name, p in model.named_parameters():
            if id(p) in ids:
                by_name[name] = group
    assert by_name["backbone.blocks.0.attn.qkv.bias"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.0.norm1.weight"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.0.ls1.gamma"]["wd_multiplier"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    last = n - 1
    assert by_name[f"backbone.blocks.{last}.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5)
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5**n)
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(
        0.2 * 0.5 ** (n + 1)
    )
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    last_layer = [k for k in by_name if "last_layer" in k]
    assert last_layer and all(by_name[k]["is_last_layer"] for k in last_layer)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen.isdisjoint(by_name)


def test_last_layer_frozen_in_first_epoch():
    cfg = cfg_for("vit_test_cpu")
    model = SSLModel(cfg, 0.0)
    opt = build_optimizer(model, cfg.optim, model.backbone.n_blocks)
    sched = Schedules(cfg.optim, cfg.train, 16)
    apply_step_values(opt, sched.at(5))
    lrs = {g["is_last_layer"]: g["lr"] for g in opt.param_groups}
    assert lrs[True] == 0.0 and lrs[False] > 0.0
    last_layer = [p for n, p in model.named_parameters() if "last_layer" in n and p.requires_grad]
    before = [p.detach().clone() for p in last_layer]
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, last_layer))
