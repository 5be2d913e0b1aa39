"""Centering and Sinkhorn-Knopp over 2 gloo ranks equal one process holding the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.losses import DINOLoss, IBOTPatchLoss

WORKER = Path(__file__).with_name("dist_loss_worker.py")


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path, free_port):
    torch.manual_seed(0)
    cls_logits = torch.rand(8, 6) * 2 - 1  # 4 rows per rank
    patch_logits = torch.rand(11, 6) * 2 - 1  # uneven: 4 masked tokens on rank 0, 7 on rank 1
    torch.save(
        {
            "cls_logits": cls_logits,
            "patch_logits": patch_logits,
            "patch_bounds": torch.tensor([0, 4, 11]),
        },
        tmp_path / "inputs.pt",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(free_port), str(tmp_path)], env=env
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    dino, ibot = DINOLoss(6), IBOTPatchLoss(6)  # no process group here
    expected_dino_sk = dino.sinkhorn_knopp_teacher(cls_logits, teacher_temp=0.07)
    expected_ibot_sk = ibot.sinkhorn_knopp_teacher(patch_logits, 0.07, torch.tensor([11]))
    dino.update_center(cls_logits)
    ibot.update_center(patch_logits)
    expected_centered = dino.softmax_center_teacher(cls_logits, teacher_temp=0.04)

    torch.testing.assert_close(torch.cat([r["dino_sk"] for r in per_rank]), expected_dino_sk)
    torch.testing.assert_close(torch.cat([r["ibot_sk"] for r in per_rank]), expected_ibot_sk)
    torch.testing.assert_close(torch.cat([r["dino_centered"] for r in per_rank]), expected_centered)
    for result in per_rank:
        torch.testing.assert_close(result["dino_center"], dino.center)
        torch.testing.assert_close(result["ibot_center"], ibot.center)
    # the distributed normalisation is not the per-rank one
    assert not torch.allclose(
        per_rank[0]["dino_sk"], DINOLoss(6).sinkhorn_knopp_teacher(cls_logits[:4], 0.07)
    )
