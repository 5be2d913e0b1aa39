"""Continued pretraining: model.pretrained loads official-layout files and run directories
strictly, with the position grid resampled; frozen parameters stay put and get no optimizer
state; the backbone unfreezes with its own warm-up; LoRA merges into plain weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain import arch, optim
from pretrain.config import load_train_config
from pretrain.models import build_backbone
from pretrain.models.vision_transformer import interpolate_pos_embed
from pretrain.pretrained import PretrainedError, apply_pretrained, read_pretrained

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/pretrain/vit_test_cpu.yaml")


def official_file(path: Path, arch_name: str, registers: int = 0, **sizes) -> Path:
    """A backbone file as DINOv2 releases them: official key names, trained at 518 px (a
    37 x 37 position grid), written by our own writer in that layout."""
    torch.manual_seed(1)
    model = build_backbone(arch_name, img_size=518, num_register_tokens=registers, **sizes)
    with torch.no_grad():  # LayerScale 1e-5 would hide whether the weights arrived
        for block in model.blocks:
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
    model.save_dinov2_checkpoint(path)
    return path


def tiny_cfg(tmp_path: Path, *extra: str):
    return load_train_config(TINY, [f"data.shards={tmp_path}", f"output_dir={tmp_path}/run",
                                    *extra])  # fmt: skip


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_an_official_layout_file_starts_student_and_teacher(tmp_path, suffix):
    path = official_file(tmp_path / f"w{suffix}", "vit_test")
    cfg = tiny_cfg(tmp_path, f"model.pretrained={path}")
    weights = read_pretrained(cfg)
    student, teacher = arch.build_student_teacher(cfg)
    apply_pretrained(student, teacher, weights)
    file = load_file(str(path)) if suffix == ".safetensors" else torch.load(path, weights_only=True)
    grid = cfg.crops.global_crops_size // cfg.model.patch_size  # 56 / 14 = 4
    got = student.backbone.state_dict()
    assert got["pos_embed"].shape == (1, 1 + grid * grid, 64)
    want_pos = interpolate_pos_embed(file["pos_embed"], (grid, grid), offset=0.0, antialias=True)
    torch.testing.assert_close(got["pos_embed"], want_pos)
    for key, value in file.items():
        if key != "pos_embed":
            assert torch.equal(got[key], value), key
    for (name, t), (_, s) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(t, s), name


@pytest.mark.parametrize(
    ("arch_name", "registers"),
    [("vit_small", 0), ("vit_small", 4), ("vit_base", 0), ("vit_base", 4)],
)
def test_official_sizes_load_with_and_without_registers(tmp_path, arch_name, registers):
    path = official_file(tmp_path / "w.pth", arch_name, registers)
    cfg = load_train_config(str(REPO / "configs/pretrain/vits14.yaml"), [
        f"data.shards={tmp_path}", f"model.arch={arch_name}",
        f"model.num_register_tokens={registers}", f"model.pretrained={path}"])  # fmt: skip
    weights = read_pretrained(cfg)
    assert weights.backbone["pos_embed"].shape[1] == 1 + 16 * 16  # 224 / 14 from 37 x 37
    student, teacher = arch.build_student_teacher(cfg)
    apply_pretrained(student, teacher, weights)
    assert torch.equal(student.backbone.blocks[-1].mlp.fc2.weight, weights.backbone["blocks." + str(student.backbone.n_blocks - 1) + ".mlp.fc2.weight"])  # fmt: skip


@pytest.mark.parametrize(("arch_name", "ffn"), [("vit_large", "mlp"), ("vit_giant2", "swiglu")])
def test_large_official_layouts_fit_their_recipes(arch_name, ffn):
    """ViT-L/g files are GBs: their layout is checked from meta tensors (no file), against the
    shipped recipes; the file path is the one the sizes above exercise."""
    from pretrain.models.dinov2_checkpoint import check_dinov2_state_dict
    from pretrain.pretrained import _Shapes

    recipe = "vitl14" if arch_name == "vit_large" else "vitg14"
    for registers in (0, 4):
        with torch.device("meta"):
            released = build_backbone(arch_name, img_size=518, num_register_tokens=registers,
                                      ffn_layer=ffn).state_dict()  # fmt: skip
            cfg = load_train_config(str(REPO / f"configs/pretrain/{recipe}.yaml"), [
                "data.shards=x", f"model.num_register_tokens={registers}"])  # fmt: skip
            model = arch.SSLModel(cfg, 0.0)
        check_dinov2_state_dict(_Shapes(model.backbone.state_dict()), released)


def test_a_mismatching_file_is_one_clear_error_before_training(tmp_path, helpers, shard_dir):
    path = official_file(tmp_path / "reg.pth", "vit_test", registers=4)
    with pytest.raises(PretrainedError, match=r"(?s)0 registers.*unexpected: register_tokens"):
        read_pretrained(tiny_cfg(tmp_path, f"model.pretrained={path}"))
    with pytest.raises(PretrainedError, match="no such file"):
        read_pretrained(tiny_cfg(tmp_path, f"model.pretrained={tmp_path}/none.pth"))
    # the CLI: the same error, no process group started, nothing written
    out = tmp_path / "run"
    proc = helpers.run_train(0, [f"data.shards={shard_dir}", f"output_dir={out}",
                                 f"model.pretrained={path}"])  # fmt: skip
    assert proc.returncode != 0 and "PretrainedError" in proc.stderr
    assert "unexpected: register_tokens" in proc.stderr
    assert "init_process_group" not in proc.stderr and not (out / "config.yaml").exists()


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _steps(cfg, n: int):
    """n real optimizer steps of the job's parts on one process (gloo group of one)."""
    from pretrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
    from pretrain.data.loader import build_pretrain_loader
    from pretrain.data.photometric import batch_to_device

    student, teacher = arch.build_student_teacher(cfg)
    losses = arch.build_losses(cfg)
    opt = optim.build_optimizer(student, cfg.optim, student.backbone.n_blocks)
    sched = optim.Schedules(cfg.optim, cfg.train, cfg.data.batch_size_per_rank)
    batches = iter(build_pretrain_loader(cfg, rank=0, world_size=1, start_batch=0)[0])
    backbone = optim.backbone_params(student)
    history = [_params(student)]
    states = []
    for step in range(n):
        batch = batch_to_device(next(batches), torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD)
        values = sched.at(step)
        optim.apply_step_values(opt, values)
        terms = arch.compute_losses(student, teacher, losses, batch, values.teacher_temp, cfg)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        if sched.backbone_frozen(step):
            optim.drop_grads(backbone)
        opt.step()
        history.append(_params(student))
        states.append({id(p) for p in opt.state})
    names = {id(p): n for n, p in student.named_parameters()}
    return history, [{names[i] for i in s} for s in states], opt


def test_frozen_backbone_steps_hold_the_backbone_then_it_moves(shard_dir, tmp_path):
    cfg = tiny_cfg(tmp_path, f"data.shards={shard_dir}/shapes-*.tar", "data.num_workers=0",
                   "train.freeze_backbone_steps=2", "optim.backbone_warmup_steps=2",
                   "optim.backbone_lr_mult=0.5", "optim.warmup_epochs=0")  # fmt: skip
    history, states, _ = _steps(cfg, 3)
    bb = [n for n in history[0] if n.startswith("backbone.")]
    for step in (1, 2):  # the frozen steps: no backbone change, no optimizer state for it
        assert all(torch.equal(history[step][n], history[0][n]) for n in bb)
        assert not any(n.startswith("backbone.") for n in states[step - 1])
        assert any(not torch.equal(history[step][n], history[step - 1][n])
                   for n in history[0] if n.startswith("dino_head."))  # fmt: skip
    assert any(not torch.equal(history[3][n], history[2][n]) for n in bb)  # unfrozen: it moves
    assert any(n.startswith("backbone.") for n in states[2])
    sched = optim.Schedules(cfg.optim, cfg.train, 8)
    assert [sched.at(s).backbone_lr_scale for s in range(5)] == [0.0, 0.0, 0.25, 0.5, 0.5]


def test_trainable_blocks_freeze_the_rest_for_good(shard_dir, tmp_path):
    cfg = tiny_cfg(tmp_path, f"data.shards={shard_dir}/shapes-*.tar", "data.num_workers=0",
                   "model.trainable_blocks=1", "optim.warmup_epochs=0")  # fmt: skip
    history, states, opt = _steps(cfg, 2)
    last = "backbone.blocks.3."
    frozen = [n for n in history[0] if n.startswith("backbone.")
              and not n.startswith((last, "backbone.norm."))]  # fmt: skip
    assert frozen and all(torch.equal(history[2][n], history[0][n]) for n in frozen)
    assert not any(n in states[-1] for n in frozen)  # never in the optimizer at all
    assert sum(len(g["params"]) for g in opt.param_groups) == len(
        [n for n in history[0] if n not in frozen]
    )
    assert any(
        not torch.equal(history[2][n], history[0][n]) for n in history[0] if n.startswith(last)
    )


def test_lora_trains_only_its_factors_and_merges_into_plain_weights(shard_dir, tmp_path):
    cfg = tiny_cfg(tmp_path, f"data.shards={shard_dir}/shapes-*.tar", "data.num_workers=0",
                   "model.lora_rank=4", "optim.warmup_epochs=0")  # fmt: skip
    history, states, _ = _steps(cfg, 2)
    lora = [n for n in history[0] if "_lora_" in n]
    base = [n for n in history[0] if n.startswith("backbone.") and "_lora_" not in n]
    assert len(lora) == 4 * 4  # 4 blocks x (qkv, proj) x (A, B)
    assert all(torch.equal(history[2][n], history[0][n]) for n in base)
    assert any(not torch.equal(history[2][n], history[0][n]) for n in lora)
    # merged: a plain backbone with W + scale * B A computes what the LoRA backbone computes
    torch.manual_seed(0)
    with_lora = arch.SSLModel(cfg, 0.0).backbone.eval()
    with torch.no_grad():
        for block in with_lora.blocks:
            block.attn.qkv_lora_b.normal_(std=0.05)
            block.attn.proj_lora_b.normal_(std=0.05)
    plain = build_backbone("vit_test", img_size=56, patch_size=14).eval()
    plain.load_state_dict(with_lora.dinov2_state_dict())
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(plain(x), with_lora(x), rtol=1e-4, atol=1e-5)
    assert not any("_lora_" in k for k in with_lora.dinov2_state_dict())


def test_a_run_directory_brings_its_heads_and_resumes_exactly(shard_dir, helpers, tmp_path):
    common = [f"data.shards={shard_dir}/shapes-*.tar", "data.num_workers=1",
              "logging.tensorboard=false", "train.log_every=1"]  # fmt: skip
    first = tmp_path / "first"
    proc = helpers.run_train(0, [*common, f"output_dir={first}", "train.steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = tiny_cfg(tmp_path, f"model.pretrained={first}")
    weights = read_pretrained(cfg)
    assert weights.heads is not None and any(k.startswith("dino_head.") for k in weights.heads)
    # a continued run, stopped and resumed, logs what the same run uninterrupted logs
    cont = [*common, f"model.pretrained={first}", "train.steps=4", "train.checkpoint_every=2",
            "train.freeze_backbone_steps=1"]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for out, stops in ((whole, [4]), (parts, [2, 4])):
        for stop in stops:
            proc = helpers.run_train(0, [*cont, f"output_dir={out}", f"train.stop_after={stop}"])
            assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = helpers.read_metrics(whole), helpers.read_metrics(parts)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[0]["backbone_lr_scale"] == 0.0 and a[1]["backbone_lr_scale"] > 0
    assert all(math.isfinite(r["loss"]) for r in a)


def test_two_ranks_train_lora_and_export_plain_weights(shard_dir, helpers, tmp_path):
    """FSDP2 over 2 gloo ranks with frozen and trainable weights in one block; the export is a
    plain DINOv2-layout backbone (LoRA merged) that loads as any other."""
    from pretrain.models import load_backbone

    out = tmp_path / "run"
    proc = helpers.run_train(2, [f"data.shards={shard_dir}/shapes-*.tar", f"output_dir={out}",
                                 "model.lora_rank=4", "model.trainable_blocks=1",
                                 "train.steps=3", "train.log_every=1", "data.num_workers=1",
                                 "logging.tensorboard=false"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(str(out / "teacher_backbone.safetensors"))
    assert not any("_lora_" in k for k in exported)
    loaded = load_backbone(out)
    assert loaded.model.n_blocks == 4
