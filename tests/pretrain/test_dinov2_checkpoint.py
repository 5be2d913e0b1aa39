"""Official DINOv2 checkpoint layout: the key/shape table of every size, file round trips with
strict keys, position-grid adoption, clear errors on mismatches, and safe loading."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import build_backbone, build_backbone_from_dinov2_checkpoint
from pretrain.models.dinov2_checkpoint import (
    check_dinov2_state_dict,
    dinov2_arch_from_state_dict,
    load_dinov2_state_dict,
)

# (embed dim, blocks, feed-forward) as released: ViT-L/14 ships with an MLP, ViT-g/14 with a
# fused SwiGLU whose hidden width is 4096 (w12 [8192, 1536], w3 [1536, 4096]).
SIZES = {
    "vit_test": (64, 4, "mlp"),
    "vit_small": (384, 12, "mlp"),
    "vit_base": (768, 12, "mlp"),
    "vit_large": (1024, 24, "swiglu"),
    "vit_giant2": (1536, 40, "swiglu"),
}
SWIGLU_HIDDEN = {64: 176, 384: 1024, 768: 2048, 1024: 2736, 1536: 4096}
OFFICIAL_GRID = 37  # the released files were trained at 518 px with patch 14


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


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("name", list(SIZES))
def test_export_layout_equals_the_official_table(name, registers):
    dim, depth, ffn = SIZES[name]
    with torch.device("meta"):
        model = build_backbone(name, num_register_tokens=registers, img_size=518)
    exported = {k: tuple(v.shape) for k, v in model.dinov2_state_dict().items()}
    assert exported == official_layout(dim, depth, ffn, registers)


def test_released_vit_large_layout_loads_with_an_mlp():
    dim, depth, _ = SIZES["vit_large"]
    released = official_file_state(dim, depth, "mlp", 4, device="meta")
    with torch.device("meta"):
        default_large = build_backbone("vit_large", num_register_tokens=4)
        mlp_large = build_backbone("vit_large", num_register_tokens=4, ffn_layer="mlp")
    with pytest.raises(KeyError, match="ffn_layer='mlp'"):
        check_dinov2_state_dict(default_large, released)
    load_dinov2_state_dict(mlp_large, released)
    assert mlp_large.pos_embed.shape == (1, 1 + 37 * 37, dim)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("name", ["vit_large", "vit_giant2"])
def test_large_sizes_load_strictly_on_meta(name, registers):
    dim, depth, ffn = SIZES[name]
    with torch.device("meta"):
        model = build_backbone(name, num_register_tokens=registers)
    load_dinov2_state_dict(model, official_file_state(dim, depth, ffn, registers, device="meta"))
    shapes = {k: tuple(v.shape) for k, v in model.dinov2_state_dict().items()}
    assert shapes == official_layout(dim, depth, ffn, registers)


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
