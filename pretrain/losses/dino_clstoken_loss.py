"""DINO loss on the CLS token: student crops against teacher probabilities of the global crops."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pretrain.losses.distributed import all_reduce_, world_size
from pretrain.losses.sinkhorn import sinkhorn_knopp


class DINOLoss(nn.Module):
    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher probabilities [n_global*B, K] after subtracting the center of earlier steps."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        global_rows = teacher_logits.shape[0] * world_size()
        return sinkhorn_knopp(teacher_logits, teacher_temp, global_rows, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA of the teacher logits' mean over the global batch (all ranks)."""
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        all_reduce_(batch_sum)
        batch_center = batch_sum / (teacher_logits.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def forward(self, student_logits: list[Tensor], teacher_probs: list[Tensor]) -> Tensor:
        """Mean cross-entropy over all (student crop i, teacher global j) pairs with i != j.

        student_logits: one [B, K] tensor per crop, the global crops first in the teacher's order.
        teacher_probs: one [B, K] tensor per teacher global crop.
        """
        if not teacher_probs or len(student_logits) < len(teacher_probs):
            raise ValueError(
                f"need the {len(teacher_probs)} global crops first among the student crops, "
                f"got {len(student_logits)} student crops"
            )
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        n_terms = 0
        for i, student in enumerate(student_logits):
            log_probs = F.log_softmax(student.float() / self.student_temp, dim=-1)
            for j, teacher in enumerate(teacher_probs):
                if i == j:  # no term for a global crop against its own teacher view
                    continue
                total = total - (teacher * log_probs).sum(dim=-1).mean()
                n_terms += 1
        if n_terms == 0:
            raise ValueError("the DINO loss needs at least one pair of different views")
        return total / n_terms
