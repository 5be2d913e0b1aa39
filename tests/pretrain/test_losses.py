"""Golden values for the DINO, iBOT and KoLeo losses against formulas written out here in NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def np_sinkhorn(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """SwAV's algorithm as written in its paper, in float64."""
    q = np.exp(logits / temp).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_dino_loss_is_the_mean_over_cross_view_pairs():
    rng = np.random.default_rng(0)
    batch, k, n_local = 3, 7, 3
    students = [rng.normal(size=(batch, k)) for _ in range(2 + n_local)]
    teachers = [np_softmax(rng.normal(size=(batch, k)) / 0.04) for _ in range(2)]
    terms = []
    for i, s in enumerate(students):
        for j, t in enumerate(teachers):
            if i != j:
                terms.append(-(t * np_log_softmax(s / 0.1)).sum(-1).mean())
    assert len(terms) == 2 + 2 * n_local
    loss = DINOLoss(k)([torch.tensor(s) for s in students], [torch.tensor(t) for t in teachers])
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-6)


def test_dino_loss_of_uniform_distributions_is_log_k():
    k = 4
    loss = DINOLoss(k)([torch.zeros(2, k)] * 4, [torch.full((2, k), 1 / k)] * 2)
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)


def test_dino_loss_gradient_reaches_the_student_only():
    student = [torch.randn(2, 5, requires_grad=True) for _ in range(3)]
    teacher = [torch.softmax(torch.randn(2, 5), -1) for _ in range(2)]
    DINOLoss(5)(student, teacher).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(ValueError, match="global crops first"):
        DINOLoss(5)(student[:1], teacher)


def test_centering_uses_the_center_of_earlier_steps_and_updates_by_ema():
    rng = np.random.default_rng(1)
    step1, step2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    loss = DINOLoss(5, center_momentum=0.9)
    probs1 = loss.softmax_center_teacher(torch.tensor(step1), teacher_temp=0.05)
    np.testing.assert_allclose(probs1.numpy(), np_softmax(step1 / 0.05), rtol=1e-5, atol=1e-7)
    loss.update_center(torch.tensor(step1))
    center1 = 0.1 * step1.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(loss.center.numpy(), center1, rtol=1e-6)
    probs2 = loss.softmax_center_teacher(torch.tensor(step2), teacher_temp=0.05)
    np.testing.assert_allclose(
        probs2.numpy(), np_softmax((step2 - center1) / 0.05), rtol=1e-4, atol=1e-7
    )
    loss.update_center(torch.tensor(step2))
    np.testing.assert_allclose(
        loss.center.numpy(), 0.9 * center1 + 0.1 * step2.mean(0, keepdims=True), rtol=1e-6
    )


def test_sinkhorn_knopp_matches_the_paper_algorithm_and_balances_prototypes():
    rng = np.random.default_rng(2)
    logits = rng.uniform(-1, 1, size=(12, 6))
    loss = DINOLoss(6)
    probs = loss.sinkhorn_knopp_teacher(torch.tensor(logits, dtype=torch.float32), teacher_temp=0.1)
    np.testing.assert_allclose(probs.numpy(), np_sinkhorn(logits, 0.1, 3), rtol=1e-4, atol=1e-6)
    # every sample's row sums to 1
    np.testing.assert_allclose(probs.sum(1).numpy(), np.ones(12), rtol=1e-5)
    # with enough iterations every prototype also gets B/K of the mass
    converged = loss.sinkhorn_knopp_teacher(
        torch.tensor(logits), teacher_temp=0.1, n_iterations=200
    )
    np.testing.assert_allclose(converged.sum(0).numpy(), np.full(6, 12 / 6), rtol=1e-4)


def test_sinkhorn_knopp_survives_logits_that_overflow_a_naive_exp():
    logits = torch.tensor([[100.0, 99.0, -100.0], [98.0, 100.0, 0.0]])
    probs = DINOLoss(3).sinkhorn_knopp_teacher(logits, teacher_temp=0.04)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def _ibot_case():
    rng = np.random.default_rng(3)
    masked_per_image = [3, 0, 2, 5]  # 4 global crops, one without a mask
    rows = sum(masked_per_image)
    student = rng.normal(size=(rows, 6))
    teacher = np_softmax(rng.normal(size=(rows, 6)) / 0.05)
    weights = np.concatenate([np.full(n, 1.0 / n) for n in masked_per_image if n])
    return masked_per_image, student, teacher, weights


def test_ibot_loss_is_a_per_image_mean_over_masked_patches():
    masked_per_image, student, teacher, weights = _ibot_case()
    per_token = -(teacher * np_log_softmax(student / 0.1)).sum(-1)
    per_image, start = [], 0
    for n in masked_per_image:
        if n:
            per_image.append(per_token[start : start + n].mean())
            start += n
    loss = IBOTPatchLoss(6)
    args = (torch.tensor(student), torch.tensor(teacher), torch.tensor(weights))
    assert loss.forward_masked(*args).item() == pytest.approx(np.mean(per_image), rel=1e-6)
    # DINOv2's normalisation: over all global crops, the unmasked one counting zero
    assert loss.forward_masked(*args, n_global_crops=4).item() == pytest.approx(
        sum(per_image) / 4, rel=1e-6
    )


def test_ibot_loss_without_masked_patches_is_zero_and_differentiable():
    student = torch.randn(0, 6, requires_grad=True)
    out = IBOTPatchLoss(6).forward_masked(student, torch.zeros(0, 6), torch.zeros(0))
    assert out.item() == 0.0
    out.backward()


def test_ibot_sinkhorn_ignores_padding_rows_and_centering_averages_tokens():
    rng = np.random.default_rng(4)
    logits = rng.uniform(-1, 1, size=(9, 5))
    loss = IBOTPatchLoss(5)
    padded = torch.tensor(np.concatenate([logits, np.full((3, 5), 50.0)]), dtype=torch.float32)
    probs = loss.sinkhorn_knopp_teacher(padded, 0.1, torch.tensor([9]))
    np.testing.assert_allclose(probs[:9].numpy(), np_sinkhorn(logits, 0.1, 3), rtol=1e-4, atol=1e-6)
    assert probs[9:].abs().sum() == 0
    loss.update_center(torch.tensor(logits))
    np.testing.assert_allclose(loss.center.numpy(), 0.1 * logits.mean(0, keepdims=True), rtol=1e-6)
    centered = loss.softmax_center_teacher(torch.tensor(logits), 0.07)
    np.testing.assert_allclose(
        centered.numpy(), np_softmax((logits - 0.1 * logits.mean(0)) / 0.07), rtol=1e-4
    )


def test_koleo_matches_a_cdist_reference():
    torch.manual_seed(0)
    cls = torch.randn(10, 16)
    features = torch.nn.functional.normalize(cls, dim=-1)
    distances = torch.cdist(features.double(), features.double())
    distances.fill_diagonal_(float("inf"))
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean()
    assert KoLeoLoss()(cls).item() == pytest.approx(expected.item(), abs=1e-5)


def test_koleo_is_fp32_finite_for_duplicates_and_refuses_a_batch_of_one():
    cls = torch.randn(4, 8).repeat(2, 1).bfloat16().requires_grad_()
    loss = KoLeoLoss()(cls)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(cls.grad.float()).all()
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 8))
