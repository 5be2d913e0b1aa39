"""The ViT backbone: multi-crop list forward, masking, registers, position embeddings, backends."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from pretrain.layers import DINOHead
from pretrain.models import VisionTransformer, build_backbone, interpolate_pos_embed


def _crops(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(3, 3, 56, 56, generator=gen)  # 4x4 patches of 14 px
    local_crops = torch.randn(5, 3, 28, 28, generator=gen)  # 2x2 patches
    masks = torch.rand(3, 16, generator=gen) > 0.5
    return global_crops, local_crops, masks


@pytest.mark.parametrize("registers", [0, 4])
def test_list_forward_equals_each_batch_alone(registers):
    torch.manual_seed(0)
    model = build_backbone("vit_test", num_register_tokens=registers, img_size=56).eval()
    global_crops, local_crops, masks = _crops()
    together = model.forward_features([global_crops, local_crops], masks=[masks, None])
    alone = [model.forward_features(global_crops, masks), model.forward_features(local_crops)]
    for joint, single in zip(together, alone):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(joint[key], single[key], rtol=0, atol=1e-6)
    assert together[0]["masks"] is masks and together[1]["masks"] is None

    # and the same gradients
    model.zero_grad()
    sum(o["x_norm_clstoken"].square().sum() for o in together).backward()
    grads_together = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(o["x_norm_clstoken"].square().sum() for o in alone).backward()
    for g_joint, p in zip(grads_together, model.parameters()):
        torch.testing.assert_close(g_joint, p.grad, rtol=1e-5, atol=1e-7)


def test_output_shapes_follow_the_contract():
    model = build_backbone("vit_test", num_register_tokens=4, patch_size=16, img_size=64)
    out = model.forward_features([torch.randn(2, 3, 64, 64), torch.randn(6, 3, 32, 48)])
    dim = model.embed_dim
    assert out[0]["x_norm_clstoken"].shape == (2, dim)
    assert out[0]["x_norm_regtokens"].shape == (2, 4, dim)
    assert out[0]["x_norm_patchtokens"].shape == (2, 16, dim)
    assert out[0]["x_prenorm"].shape == (2, 1 + 4 + 16, dim)
    assert out[1]["x_norm_patchtokens"].shape == (6, 2 * 3, dim)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_fully_masked_images_no_longer_depend_on_their_pixels():
    torch.manual_seed(0)
    model = build_backbone("vit_test", img_size=56).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    images = torch.randn(2, 3, 56, 56)
    all_masked = torch.ones(2, 16, dtype=torch.bool)
    out = model.forward_features(images, all_masked)["x_norm_patchtokens"]
    torch.testing.assert_close(out[0], out[1])
    unmasked = model.forward_features(images)["x_norm_patchtokens"]
    assert not torch.allclose(unmasked[0], unmasked[1])
    # a masked patch's embedding is the mask token before the position embedding is added
    tokens = model.prepare_tokens_with_masks(images, all_masked)
    torch.testing.assert_close(tokens[0, 1:], model.mask_token + model.pos_embed[0, 1:])


def test_register_tokens_are_inserted_after_the_position_embedding():
    model = VisionTransformer(
        img_size=28, patch_size=14, embed_dim=8, depth=0, num_heads=2, num_register_tokens=3
    )
    with torch.no_grad():
        model.register_tokens.normal_()
        model.pos_embed.normal_()
    tokens = model.forward_features(torch.randn(2, 3, 28, 28))["x_prenorm"]
    assert tokens.shape == (2, 1 + 3 + 4, 8)
    torch.testing.assert_close(tokens[:, 1:4], model.register_tokens.expand(2, -1, -1))
    torch.testing.assert_close(
        tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[0].expand(2, -1)
    )


def test_pos_embed_interpolation_is_the_identity_at_native_size():
    model = build_backbone("vit_test", img_size=56)
    assert model.interpolate_pos_encoding(56, 56) is model.pos_embed
    resampled = interpolate_pos_embed(model.pos_embed.detach(), (4, 4), offset=0.0)
    torch.testing.assert_close(resampled, model.pos_embed.detach(), rtol=0, atol=1e-6)
    # offset 0.1 (DINOv2's) still lands on the requested grid for other sizes
    assert model.interpolate_pos_encoding(98, 70).shape == (1, 1 + 7 * 5, model.embed_dim)


def test_pos_embed_resampling_follows_dinov2_released_settings():
    plain, with_registers = (
        build_backbone("vit_test"),
        build_backbone("vit_test", num_register_tokens=4),
    )
    assert (plain.interpolate_offset, plain.interpolate_antialias) == (0.1, False)
    assert (with_registers.interpolate_offset, with_registers.interpolate_antialias) == (0.0, True)
    # register models: an exact-size antialiased bicubic resize of the 16x16 grid to 7x7
    pos = with_registers.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bicubic", antialias=True)
    got = (
        with_registers.interpolate_pos_encoding(98, 98)[:, 1:]
        .reshape(1, 7, 7, -1)
        .permute(0, 3, 1, 2)
    )
    torch.testing.assert_close(got, expected)
    # the 0.1 offset samples a slightly different grid than an exact resize
    offset = plain.interpolate_pos_encoding(98, 98)
    exact = interpolate_pos_embed(plain.pos_embed.detach(), (7, 7), offset=0.0)
    assert offset.shape == exact.shape and not torch.allclose(offset, exact)


def test_pos_embed_interpolation_keeps_rows_and_columns_apart():
    grid = 6
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32),
        torch.arange(grid, dtype=torch.float32),
        indexing="ij",
    )
    pos = torch.cat(
        [torch.zeros(1, 1, 2), torch.stack([rows, cols], -1).reshape(1, grid * grid, 2)], dim=1
    )
    out = interpolate_pos_embed(pos, (9, 4), offset=0.0)[0, 1:].reshape(9, 4, 2)  # [h, w, 2]
    # the row coordinate grows down the 9 rows and is constant along a row; columns the other way
    assert (out[1:, :, 0] > out[:-1, :, 0]).all() and torch.allclose(
        out[:, :1, 0].expand(9, 4), out[..., 0]
    )
    assert (out[:, 1:, 1] > out[:, :-1, 1]).all() and torch.allclose(
        out[:1, :, 1].expand(9, 4), out[..., 1]
    )


def test_intermediate_layers_match_the_final_features():
    torch.manual_seed(0)
    model = build_backbone("vit_test", num_register_tokens=2, img_size=56).eval()
    images = torch.randn(2, 3, 56, 56)
    features = model.forward_features(images)
    ((patches, cls),) = model.get_intermediate_layers(images, n=1)
    torch.testing.assert_close(patches, features["x_norm_patchtokens"])
    torch.testing.assert_close(cls, features["x_norm_clstoken"])
    torch.testing.assert_close(model(images), features["x_norm_clstoken"])
    four = model.get_intermediate_layers(images, n=4, return_class_token=False, reshape=True)
    assert len(four) == 4 and four[0].shape == (2, model.embed_dim, 4, 4)
    assert not torch.allclose(four[0], four[3])
    with pytest.raises(ValueError, match="does not select"):
        model.get_intermediate_layers(images, n=5)


def test_drop_path_is_uniform_and_only_active_in_training():
    torch.manual_seed(0)
    model = build_backbone("vit_test", drop_path_rate=0.3, img_size=56)
    assert [b.drop_path.drop_prob for b in model.blocks] == [0.3] * model.n_blocks
    images = torch.randn(8, 3, 56, 56)
    model.train()
    assert not torch.allclose(model(images), model(images))
    model.eval()
    torch.testing.assert_close(model(images), model(images))


def test_every_parameter_gets_a_gradient():
    model = build_backbone("vit_test", num_register_tokens=2, img_size=56)
    global_crops, local_crops, masks = _crops()
    outs = model.forward_features([global_crops, local_crops], [masks, None])
    loss = sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].square().mean() for o in outs)
    loss.backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert no_grad == []


def test_bad_inputs_raise_clear_errors():
    model = build_backbone("vit_test", img_size=56)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match="masks must be bool"):
        model.forward_features(torch.randn(2, 3, 56, 56), torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 crop batches but 1 masks"):
        model.forward_features([torch.randn(1, 3, 56, 56), torch.randn(1, 3, 28, 28)], [None])
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="ffn_layer"):
        build_backbone("vit_test", ffn_layer="moe")


def test_env_var_overrides_the_attention_backend(monkeypatch):
    monkeypatch.setenv("DINOFORGE_ATTN", "sdpa")
    model = build_backbone("vit_test", attn_backend="xformers", img_size=56)
    assert {b.attn.attn_backend for b in model.blocks} == {"sdpa"}
    monkeypatch.setenv("DINOFORGE_ATTN", "flash")
    with pytest.raises(ValueError, match="DINOFORGE_ATTN"):
        build_backbone("vit_test")


def test_forcing_xformers_off_the_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DINOFORGE_ATTN", raising=False)
    try:
        model = build_backbone("vit_test", attn_backend="xformers", img_size=56)
    except RuntimeError as exc:  # xformers is not installed here
        assert "xformers" in str(exc) and "sdpa" in str(exc)
        return
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        model(torch.randn(1, 3, 56, 56))


def test_dino_head_projects_onto_weight_normalised_prototypes():
    torch.manual_seed(0)
    head = DINOHead(in_dim=32, out_dim=100, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    assert parametrize.is_parametrized(head.last_layer, "weight")
    torch.testing.assert_close(
        head.last_layer.parametrizations.weight.original0, torch.ones(100, 1)
    )
    x = torch.randn(5, 32)
    logits = head(x)
    assert logits.shape == (5, 100)
    # with unit prototype norms the logits are cosine similarities
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    direction = head.last_layer.parametrizations.weight.original1
    expected = bottleneck @ torch.nn.functional.normalize(direction, dim=-1).t()
    torch.testing.assert_close(logits, expected)
    assert DINOHead(32, 10, nlayers=1)(x).shape == (5, 10)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(32, 10, nlayers=0)


def test_packed_attention_unpacks_to_the_per_resolution_result(monkeypatch, reference_xformers):
    from pretrain.layers import attention

    monkeypatch.setattr(attention, "xformers_ops", lambda: reference_xformers)
    attention._block_diagonal_mask.cache_clear()
    torch.manual_seed(0)
    attn = attention.Attention(64, 4, attn_backend="sdpa")
    xs = [torch.randn(3, 17, 64, requires_grad=True), torch.randn(5, 5, 64, requires_grad=True)]
    per_resolution = attn.forward_list(xs)
    packed = attn._packed_xformers(xs)
    attention._block_diagonal_mask.cache_clear()
    for a, b in zip(packed, per_resolution):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    grads_packed = torch.autograd.grad(sum(p.square().sum() for p in packed), xs)
    grads_ref = torch.autograd.grad(sum(p.square().sum() for p in per_resolution), xs)
    for a, b in zip(grads_packed, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
