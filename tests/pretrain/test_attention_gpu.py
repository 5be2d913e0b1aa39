"""xformers' packed block-diagonal attention equals SDPA per resolution (needs CUDA + an
xformers built for this torch: skipped with the probe's reason where it cannot run)."""

from __future__ import annotations

import pytest
import torch

from pretrain.layers.attention import xformers_unusable_reason
from pretrain.models import build_backbone

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(model, crops, masks):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = model.forward_features(crops, masks)
    loss = sum(
        o["x_norm_clstoken"].float().square().mean() + o["x_norm_patchtokens"].float().mean()
        for o in outs
    )
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
    return [{k: v.float() for k, v in o.items() if k.startswith("x_")} for o in outs], grads


@pytest.mark.parametrize("registers", [0, 4])
def test_packed_xformers_equals_sdpa_per_resolution(monkeypatch, registers):
    reason = xformers_unusable_reason(torch.device("cuda", 0), torch.bfloat16)
    if reason is not None:
        pytest.skip(f"xformers cannot run here: {reason}")
    monkeypatch.delenv("DINOFORGE_ATTN", raising=False)
    torch.manual_seed(0)
    model = build_backbone("vit_small", num_register_tokens=registers, attn_backend="sdpa").cuda()
    crops = [torch.randn(4, 3, 224, 224, device="cuda"), torch.randn(16, 3, 98, 98, device="cuda")]
    masks = [torch.rand(4, 256, device="cuda") > 0.5, None]
    outs_sdpa, grads_sdpa = _run(model, crops, masks)
    model.set_attn_backend("xformers")
    outs_packed, grads_packed = _run(model, crops, masks)
    for a, b in zip(outs_packed, outs_sdpa):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=2e-2, atol=3e-2)
    for name, grad in grads_sdpa.items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (grads_packed[name] - grad).abs().max() / scale < 5e-2, name


def test_auto_attention_trains_a_step_whatever_xformers_does(monkeypatch):
    """What crashed on the H200: `auto` with an xformers that imports but cannot run."""
    monkeypatch.delenv("DINOFORGE_ATTN", raising=False)
    model = build_backbone("vit_small", attn_backend="auto").cuda()
    backend = model.resolve_attention(torch.device("cuda", 0), torch.bfloat16)
    reason = xformers_unusable_reason(torch.device("cuda", 0), torch.bfloat16)
    assert backend == ("sdpa" if reason else "xformers")
    crops = [torch.randn(4, 3, 224, 224, device="cuda"), torch.randn(16, 3, 98, 98, device="cuda")]
    outs, grads = _run(model, crops, [None, None])
    assert all(torch.isfinite(g).all() for g in grads.values())
