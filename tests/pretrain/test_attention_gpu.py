"""xformers' packed block-diagonal attention equals SDPA per resolution (needs CUDA + xformers)."""

from __future__ import annotations

import pytest
import torch

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
    pytest.importorskip("xformers.ops")
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
