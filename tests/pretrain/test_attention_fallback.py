"""`auto` attention never crashes: it probes xformers once per (device, dtype) and falls back
to SDPA with one log line naming the reason; a forced `xformers` that cannot run is an error
naming it. xformers has no CPU kernels, so the packed path runs here through the dense
stand-in of conftest.py, on a CPU declared a packed-attention device."""

from __future__ import annotations

import logging

import pytest
import torch

from pretrain.layers import attention
from pretrain.models import build_backbone

CPU = torch.device("cpu")


class _RefusingOps:
    """What xformers 0.0.35 did on torch 2.11: every operator refused."""

    class fmha:  # noqa: N801 - mirrors the xformers.ops.fmha namespace
        class BlockDiagonalMask:
            @classmethod
            def from_seqlens(cls, seqlens, device=None):
                return cls()

    @staticmethod
    def memory_efficient_attention(q, k, v, attn_bias):
        raise NotImplementedError(
            "No operator found for `memory_efficient_attention_forward` with inputs:\n"
            "`cutlassF-pt` is not supported because:\n    xFormers wasn't build with CUDA support"
        )


def _wrong_ops(reference):
    class Wrong(reference):
        @staticmethod
        def memory_efficient_attention(q, k, v, attn_bias):
            return reference.memory_efficient_attention(q, k, v, attn_bias) + 0.5

    return Wrong


@pytest.fixture
def packed_cpu(monkeypatch):
    """A CPU that counts as a packed-attention device, with fresh probe caches; returns a
    function installing an ops module as `xformers.ops`."""
    monkeypatch.delenv("DINOFORGE_ATTN", raising=False)
    monkeypatch.setattr(attention, "PACKED_DEVICE_TYPES", ("cuda", "cpu"))
    caches = (attention.xformers_unusable_reason, attention._auto_backend)
    for cache in (*caches, attention._block_diagonal_mask):
        cache.cache_clear()

    def install(ops):
        monkeypatch.setattr(attention, "_import_xformers", lambda: (ops, None))

    yield install
    for cache in (*caches, attention._block_diagonal_mask):
        cache.cache_clear()


def test_the_probe_passes_a_working_kernel_and_names_what_fails(reference_xformers):
    assert attention.probe_packed_attention(reference_xformers, CPU, torch.float32) is None
    reason = attention.probe_packed_attention(_RefusingOps, CPU, torch.float32)
    assert reason.startswith("NotImplementedError: No operator found")
    wrong = attention.probe_packed_attention(_wrong_ops(reference_xformers), CPU, torch.float32)
    assert "differs from SDPA by 0.5" in wrong


def test_auto_falls_back_to_sdpa_with_one_log_line(packed_cpu, caplog):
    packed_cpu(_RefusingOps)
    torch.manual_seed(0)
    model = build_backbone("vit_test", img_size=56, attn_backend="auto")
    reference = build_backbone("vit_test", img_size=56, attn_backend="sdpa")
    reference.load_state_dict(model.state_dict())
    crops = [torch.randn(2, 3, 56, 56), torch.randn(4, 3, 28, 28)]
    with caplog.at_level(logging.WARNING, logger="pretrain.layers.attention"):
        outs = model.forward_features(crops)
        model.forward_features(crops)  # a second step: no second probe, no second line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "using SDPA" in lines[0] and "NotImplementedError: No operator found" in lines[0]
    assert "xFormers wasn't build with CUDA support" in lines[0]
    for got, want in zip(outs, reference.forward_features(crops)):
        torch.testing.assert_close(got["x_norm_clstoken"], want["x_norm_clstoken"])


def test_auto_takes_xformers_where_the_probe_passes(packed_cpu, reference_xformers, monkeypatch):
    packed_cpu(reference_xformers)
    calls = []
    real = attention.Attention._packed_xformers
    monkeypatch.setattr(
        attention.Attention, "_packed_xformers", lambda self, xs: calls.append(1) or real(self, xs)
    )
    torch.manual_seed(0)
    model = build_backbone("vit_test", img_size=56, attn_backend="auto")
    reference = build_backbone("vit_test", img_size=56, attn_backend="sdpa")
    reference.load_state_dict(model.state_dict())
    crops = [torch.randn(2, 3, 56, 56), torch.randn(4, 3, 28, 28)]
    outs = model.forward_features(crops)
    assert len(calls) == model.n_blocks  # every block ran the packed kernel
    for got, want in zip(outs, reference.forward_features(crops)):
        torch.testing.assert_close(got["x_norm_patchtokens"], want["x_norm_patchtokens"])


def test_a_wrong_kernel_is_set_aside_too(packed_cpu, reference_xformers):
    packed_cpu(_wrong_ops(reference_xformers))
    model = build_backbone("vit_test", img_size=56, attn_backend="auto")
    assert model.resolve_attention(CPU, torch.float32) == "sdpa"


def test_forced_xformers_that_cannot_run_is_an_error_naming_why(packed_cpu):
    packed_cpu(_RefusingOps)
    model = build_backbone("vit_test", img_size=56, attn_backend="xformers")
    with pytest.raises(RuntimeError, match="cannot run on cpu.*No operator found.*'auto'"):
        model(torch.randn(1, 3, 56, 56))


def test_resolving_before_compile_probes_once_and_forwards_never_probe(
    packed_cpu, reference_xformers, monkeypatch
):
    packed_cpu(reference_xformers)
    probes = []
    real = attention.probe_packed_attention
    monkeypatch.setattr(
        attention, "probe_packed_attention", lambda *a: probes.append(a[1:]) or real(*a)
    )
    model = build_backbone("vit_test", img_size=56, attn_backend="auto")
    assert model.resolve_attention(CPU, torch.bfloat16) == "xformers"
    assert probes == [(CPU, torch.bfloat16)]
    monkeypatch.setattr(attention, "_auto_backend", None)  # a forward reaching it would fail
    model(torch.randn(1, 3, 56, 56))
    model.set_attn_backend("sdpa")  # switching again clears what was settled
    assert {b.attn.resolved_backend for b in model.blocks} == {None}


def test_auto_off_the_gpu_never_probes(monkeypatch):
    monkeypatch.delenv("DINOFORGE_ATTN", raising=False)
    monkeypatch.setattr(attention, "probe_packed_attention", None)  # calling it would fail
    model = build_backbone("vit_test", img_size=56, attn_backend="auto")
    assert model.resolve_attention(CPU, torch.float32) == "sdpa"
    assert model(torch.randn(1, 3, 56, 56)).shape == (1, 64)
