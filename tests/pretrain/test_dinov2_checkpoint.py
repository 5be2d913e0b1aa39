"""Official DINOv2 checkpoint layout: the key/shape table and parameter count of every released
size, file round trips with strict keys, position-grid adoption, clear errors on mismatches, safe
loading, and `load_backbone` on files and training run directories."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pretrain.models import build_backbone, build_backbone_from_dinov2_checkpoint, load_backbone
from pretrain.models.dinov2_checkpoint import (
    check_dinov2_state_dict,
    dinov2_arch_from_state_dict,
    load_dinov2_state_dict,
    save_dinov2_checkpoint,
)

# (embed dim, blocks, feed-forward) as released: S, B and L/14 ship with a plain MLP (fc1/fc2),
# ViT-g/14 with a fused SwiGLU whose hidden width is 4096 (w12 [8192, 1536], w3 [1536, 4096]).
SIZES = {
    "vit_test": (64, 4, "mlp"),
    "vit_small": (384, 12, "mlp"),
    "vit_base": (768, 12, "mlp"),
    "vit_large": (1024, 24, "mlp"),
    "vit_giant2": (1536, 40, "swiglu"),
}
SWIGLU_HIDDEN = {64: 176, 384: 1024, 768: 2048, 1024: 2736, 1536: 4096}
OFFICIAL_GRID = 37  # the released files were trained at 518 px with patch 14
# dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth and the architecture each one is
RELEASED = {
    "vits14": "vit_small",
    "vitb14": "vit_base",
    "vitl14": "vit_large",
    "vitg14": "vit_giant2",
}
VITL14_PARAMETERS = 304_368_640  # dinov2_vitl14_pretrain.pth, mask_token included


def official_layout(
    dim: int, depth: int, ffn: str, registers: int, grid: int = OFFICIAL_GRID
) -> dict:
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        block = {
            "norm1.weight": (dim,),
            "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim),
            "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim),
            "attn.proj.bias": (dim,),
            "ls1.gamma": (dim,),
            "norm2.weight": (dim,),
            "norm2.bias": (dim,),
            "ls2.gamma": (dim,),
        }
        if ffn == "mlp":
            block |= {"mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,)}
            block |= {"mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
        else:
            hidden = SWIGLU_HIDDEN[dim]
            block |= {"mlp.w12.weight": (2 * hidden, dim), "mlp.w12.bias": (2 * hidden,)}
            block |= {"mlp.w3.weight": (dim, hidden), "mlp.w3.bias": (dim,)}
        shapes |= {f"blocks.{i}.{name}": shape for name, shape in block.items()}
    return shapes


def official_file_state(dim, depth, ffn, registers, device="cpu", seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed) if device == "cpu" else None
    return {
        key: torch.randn(shape, generator=gen)
        if device == "cpu"
        else torch.empty(shape, device="meta")
        for key, shape in official_layout(dim, depth, ffn, registers).items()
    }


def released_parameter_count(dim: int, depth: int, ffn: str, registers: int) -> int:
    """Closed form over the official tensors (not over our modules): tokens, patch embedding,
    blocks, final norm."""
    grid, patch = OFFICIAL_GRID, 14
    # cls_token [1,1,D] + pos_embed [1,1+37*37,D] + register_tokens [1,R,D] + mask_token [1,D]
    tokens = dim * (1 + (1 + grid * grid) + registers + 1)
    patch_embed = dim * 3 * patch * patch + dim  # Conv2d(3, D, 14, 14) with bias
    if ffn == "mlp":  # fc1 [4D, D] + [4D], fc2 [D, 4D] + [D]
        feed_forward = (4 * dim * dim + 4 * dim) + (dim * 4 * dim + dim)
    else:  # w12 [2H, D] + [2H], w3 [D, H] + [D]
        hidden = SWIGLU_HIDDEN[dim]
        feed_forward = (2 * hidden * dim + 2 * hidden) + (dim * hidden + dim)
    block = (
        2 * dim  # norm1 weight, bias
        + (3 * dim * dim + 3 * dim)  # attn.qkv
        + (dim * dim + dim)  # attn.proj
        + dim  # ls1.gamma
        + 2 * dim  # norm2
        + feed_forward
        + dim  # ls2.gamma
    )
    return tokens + patch_embed + depth * block + 2 * dim  # + final norm


def test_released_vit_large_has_the_released_parameter_count():
    assert released_parameter_count(1024, 24, "mlp", 0) == VITL14_PARAMETERS
    with torch.device("meta"):
        model = build_backbone("vit_large", img_size=518)
    assert sum(p.numel() for p in model.parameters()) == 304_368_640
    assert model.ffn_layer == "mlp" and hasattr(model.blocks[0].mlp, "fc1")


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("release", list(RELEASED))
def test_released_layouts_count_infer_and_load(release, registers):
    """Every released file: the architecture is read off its keys and shapes, the backbone built
    from that has exactly the released number of parameters, and the file loads strictly (meta
    tensors, so ViT-g allocates nothing)."""
    name = RELEASED[release]
    dim, depth, ffn = SIZES[name]
    state = official_file_state(dim, depth, ffn, registers, device="meta")
    arch = dinov2_arch_from_state_dict(state)
    assert arch == {
        "name": name,
        "patch_size": 14,
        "img_size": 14 * OFFICIAL_GRID,
        "num_register_tokens": registers,
        "ffn_layer": ffn,
        "layerscale_init": 1e-5,
    }
    with torch.device("meta"):
        model = build_backbone(arch.pop("name"), **arch)
        default = build_backbone(name, num_register_tokens=registers, img_size=518)
    expected = released_parameter_count(dim, depth, ffn, registers)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in default.parameters()) == expected  # ARCHS' own feed-forward
    check_dinov2_state_dict(default, state)
    load_dinov2_state_dict(model, state)
    assert {k: tuple(v.shape) for k, v in model.dinov2_state_dict().items()} == official_layout(
        dim, depth, ffn, registers
    )


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("name", list(SIZES))
def test_export_layout_equals_the_official_table(name, registers):
    dim, depth, ffn = SIZES[name]
    with torch.device("meta"):
        model = build_backbone(name, num_register_tokens=registers, img_size=518)
    exported = {k: tuple(v.shape) for k, v in model.dinov2_state_dict().items()}
    assert exported == official_layout(dim, depth, ffn, registers)


def test_feed_forward_mismatches_hint_at_the_fix():
    dim, depth, _ = SIZES["vit_large"]
    released = official_file_state(dim, depth, "mlp", 4, device="meta")
    with torch.device("meta"):
        swiglu_large = build_backbone("vit_large", num_register_tokens=4, ffn_layer="swiglu")
        default_large = build_backbone("vit_large", num_register_tokens=4)  # 224 px
    with pytest.raises(KeyError, match="ffn_layer='mlp'"):
        check_dinov2_state_dict(swiglu_large, released)
    load_dinov2_state_dict(default_large, released)  # adopts the file's 37 x 37 grid
    assert default_large.pos_embed.shape == (1, 1 + 37 * 37, dim)
    dim, depth, _ = SIZES["vit_giant2"]
    with torch.device("meta"):
        mlp_giant = build_backbone("vit_giant2", ffn_layer="mlp")
    with pytest.raises(KeyError, match="ffn_layer='swiglu'"):
        check_dinov2_state_dict(mlp_giant, official_file_state(dim, depth, "swiglu", 0, "meta"))


def _round_trip(name: str, registers: int, tmp_path, suffix: str = ".pth") -> None:
    dim, depth, ffn = SIZES[name]
    state = official_file_state(dim, depth, ffn, registers)
    path = tmp_path / f"dinov2_{name}_reg{registers}_pretrain.pth"
    torch.save(state, path)
    model = build_backbone(name, num_register_tokens=registers)  # built for 224 px, file is 518 px
    model.load_dinov2_checkpoint(path)
    exported = model.dinov2_state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)
    again = tmp_path / f"ours{suffix}"
    model.save_dinov2_checkpoint(again)
    reloaded = build_backbone(name, num_register_tokens=registers)
    reloaded.load_dinov2_checkpoint(again)
    assert all(torch.equal(v, state[k]) for k, v in reloaded.dinov2_state_dict().items())


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("name", ["vit_test", "vit_small", "vit_base"])
def test_file_round_trip(name, registers, tmp_path):
    _round_trip(name, registers, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("registers", [0, 4])
def test_file_round_trip_vit_large(registers, tmp_path):
    _round_trip("vit_large", registers, tmp_path)


def test_safetensors_round_trip_and_inferred_architecture(tmp_path):
    torch.manual_seed(0)
    model = build_backbone(
        "vit_test", num_register_tokens=4, img_size=56, ffn_layer="swiglu"
    ).eval()
    model.save_dinov2_checkpoint(tmp_path / "teacher.safetensors")
    rebuilt = build_backbone_from_dinov2_checkpoint(tmp_path / "teacher.safetensors").eval()
    assert (
        rebuilt.num_register_tokens == 4 and rebuilt.ffn_layer == "swiglu" and rebuilt.n_blocks == 4
    )
    images = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(rebuilt(images), model(images), rtol=0, atol=0)


def test_loaded_official_grid_still_runs_at_crop_sizes(tmp_path):
    dim, depth, ffn = SIZES["vit_test"]
    torch.save(official_file_state(dim, depth, ffn, 0), tmp_path / "w.pth")
    model = build_backbone("vit_test")
    model.load_dinov2_checkpoint(tmp_path / "w.pth")
    outs = model.forward_features([torch.randn(2, 3, 224, 224), torch.randn(2, 3, 98, 98)])
    assert outs[0]["x_norm_patchtokens"].shape == (2, 256, dim)
    assert outs[1]["x_norm_patchtokens"].shape == (2, 49, dim)
    assert all(torch.isfinite(o["x_prenorm"]).all() for o in outs)
    assert dinov2_arch_from_state_dict(model.dinov2_state_dict())["img_size"] == 518


def test_mismatches_name_what_is_wrong(tmp_path):
    dim, depth, ffn = SIZES["vit_test"]
    torch.save(official_file_state(dim, depth, ffn, 4), tmp_path / "reg4.pth")
    with pytest.raises(KeyError, match="num_register_tokens"):
        build_backbone("vit_test").load_dinov2_checkpoint(tmp_path / "reg4.pth")
    wide = official_file_state(dim, depth, ffn, 0)
    wide["norm.weight"] = torch.ones(dim + 1)
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="norm.weight"):
        build_backbone("vit_test").load_dinov2_checkpoint(tmp_path / "wide.pth")
    with pytest.raises(FileNotFoundError):
        build_backbone("vit_test").load_dinov2_checkpoint(tmp_path / "absent.pth")


def test_wrapper_prefixes_are_stripped(tmp_path):
    dim, depth, ffn = SIZES["vit_test"]
    state = official_file_state(dim, depth, ffn, 0)
    torch.save({f"backbone.{k}": v for k, v in state.items()}, tmp_path / "wrapped.pth")
    model = build_backbone("vit_test")
    model.load_dinov2_checkpoint(tmp_path / "wrapped.pth")
    assert torch.equal(model.cls_token, state["cls_token"])


class _NotATensor:
    pass


def test_files_with_arbitrary_pickled_objects_are_refused(tmp_path):
    torch.save({"cls_token": torch.zeros(1), "payload": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only"):
        build_backbone("vit_test").load_dinov2_checkpoint(tmp_path / "evil.pth")


# load_backbone: one function for official files, our exports and training run directories.


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_loaded(loaded, reference, path, *, name, image_size, size=56) -> None:
    assert (loaded.name, loaded.embed_dim, loaded.patch_size) == (name, reference.embed_dim, 14)
    assert loaded.image_size == image_size
    assert loaded.source == path.resolve() and loaded.sha256 == _sha256(path)
    model = loaded.model
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference.eval()(images), rtol=0, atol=0)


def test_load_backbone_reads_a_safetensors_export(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit_test", num_register_tokens=4, img_size=56)
    path = tmp_path / "teacher.safetensors"
    save_dinov2_checkpoint(model, path)
    loaded = load_backbone(path, attn_backend="sdpa")
    _check_loaded(loaded, model, path, name="vit_test", image_size=224)
    assert loaded.model.num_register_tokens == 4 and loaded.model.pos_embed.shape[1] == 1 + 16


def test_load_backbone_reads_an_official_pth_file(tmp_path):
    dim, depth, ffn = SIZES["vit_test"]
    state = official_file_state(dim, depth, ffn, 0, seed=3)
    path = tmp_path / "dinov2_vittest14_pretrain.pth"
    torch.save(state, path)
    reference = build_backbone("vit_test", img_size=518)
    reference.load_state_dict(state)  # plain torch, not our loader
    loaded = load_backbone(str(path))  # a str works as well as a Path
    _check_loaded(loaded, reference, path, name="vit_test", image_size=224, size=98)


def test_load_backbone_reads_a_training_run_dir(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vit_test", img_size=56)
    run = tmp_path / "run"
    save_dinov2_checkpoint(model, run / "teacher_backbone.safetensors")
    config = {"model": {"arch": "vit_test"}, "crops": {"global_crops_size": 56}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_backbone(run)
    _check_loaded(
        loaded, model, run / "teacher_backbone.safetensors", name="vit_test", image_size=56
    )


def test_load_backbone_returns_fp32_from_a_half_precision_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_backbone("vit_test", img_size=56)
    half = {k: v.half() for k, v in model.dinov2_state_dict().items()}
    save_file(half, tmp_path / "half.safetensors")
    loaded = load_backbone(tmp_path / "half.safetensors")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    torch.testing.assert_close(loaded.model.pos_embed.detach(), half["pos_embed"].float())


def test_load_backbone_names_what_is_missing(tmp_path):
    run = tmp_path / "stopped_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("crops:\n  global_crops_size: 56\n")
    with pytest.raises(FileNotFoundError, match="python -m pretrain.export --checkpoint") as err:
        load_backbone(run)
    assert str(run) in str(err.value) and "teacher_backbone.safetensors" in str(err.value)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_backbone(tmp_path / "absent.pth")


def test_load_backbone_refuses_files_that_are_not_a_vit(tmp_path):
    torch.save({"cls_token": torch.zeros(1), "payload": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth.*[Ww]eights only"):
        load_backbone(tmp_path / "evil.pth")
    torch.save({"step": 3, "model": {"w": torch.zeros(1)}}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="nested.pth does not hold a flat state dict"):
        load_backbone(tmp_path / "nested.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors is not a readable weights file"):
        load_backbone(tmp_path / "garbage.safetensors")
    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    torch.save(convnet.state_dict(), tmp_path / "convnet.pth")
    with pytest.raises(KeyError, match="convnet.pth: not a DINOv2 ViT backbone") as err:
        load_backbone(tmp_path / "convnet.pth")
    assert "\\n" not in str(err.value)  # printed as written, not as a quoted repr


def test_load_backbone_refuses_unknown_keys_with_hints(tmp_path):
    dim, depth, ffn = SIZES["vit_test"]
    state = official_file_state(dim, depth, ffn, 0) | {"head.weight": torch.zeros(10, dim)}
    torch.save(state, tmp_path / "with_head.pth")
    with pytest.raises(KeyError, match=r"with_head.pth: checkpoint keys do not match") as err:
        load_backbone(tmp_path / "with_head.pth")
    assert "unexpected: head.weight" in str(err.value)
    state = official_file_state(dim, depth, ffn, 0)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(3, dim)
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(
        ValueError, match=r"(?s)narrow.pth: checkpoint tensor shapes .*fc1.weight: file \(3, 64\)"
    ):
        load_backbone(tmp_path / "narrow.pth")
    state = official_file_state(64, 3, ffn, 0)  # no known size has 3 blocks of 64
    torch.save(state, tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match="shallow.pth: no known ViT size"):
        load_backbone(tmp_path / "shallow.pth")


# the curation pipeline imports pretrain.models: it must not pull in the training stack
ALLOWED_IMPORTS = ("pretrain.models", "pretrain.layers", "pretrain.safe_yaml")


def test_load_backbone_imports_nothing_else_of_pretrain(tmp_path):
    torch.manual_seed(0)
    save_dinov2_checkpoint(build_backbone("vit_test", img_size=56), tmp_path / "w.safetensors")
    code = (
        "import sys\n"
        "from pretrain.models import load_backbone\n"
        f"load_backbone({str(tmp_path / 'w.safetensors')!r})\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('pretrain'))))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = [m for m in out if m != "pretrain" and not m.startswith(ALLOWED_IMPORTS)]
    assert outside == [], out


def test_a_custom_size_export_loads_back_with_its_head_count(tmp_path):
    """model.embed_dim/depth/num_heads runs: the .safetensors export records num_heads."""
    from pretrain.models import build_backbone, load_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_test", img_size=56, embed_dim=32, depth=2, num_heads=2).eval()
    path = tmp_path / "thin.safetensors"
    model.save_dinov2_checkpoint(path)
    loaded = load_backbone(path).model
    assert (loaded.embed_dim, loaded.n_blocks, loaded.num_heads) == (32, 2, 2)
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(loaded(x), model(x))
    model.save_dinov2_checkpoint(tmp_path / "thin.pth")  # a .pth carries no metadata
    with pytest.raises(ValueError, match="records its head count"):
        load_backbone(tmp_path / "thin.pth")
