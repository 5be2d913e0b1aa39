"""iBOT loss: masked student patch tokens against the teacher's tokens at the same positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pretrain.losses.distributed import all_reduce_
from pretrain.losses.sinkhorn import sinkhorn_knopp


class IBOTPatchLoss(nn.Module):
    def __init__(
        self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, patch_out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_logits: Tensor, teacher_temp: float) -> Tensor:
        return F.softmax((teacher_patch_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_patch_logits: Tensor,
        teacher_temp: float,
        n_masked_patches: Tensor | int,
        n_iterations: int = 3,
    ) -> Tensor:
        """n_masked_patches: this rank's count of real masked rows (an int, or the [1] tensor
        from collate, kept on the host: reading a device tensor here would stall the step).
        Rows past it (padding up to a fixed upper bound) are ignored and returned as zeros."""
        count = int(torch.as_tensor(n_masked_patches).reshape(-1)[0])
        if not 0 <= count <= teacher_patch_logits.shape[0]:
            raise ValueError(
                f"n_masked_patches={count} outside [0, {teacher_patch_logits.shape[0]}]"
            )
        # torch.full fills on the device: no host-to-device copy, so no wait for the stream.
        global_count = all_reduce_(torch.full((), float(count), device=teacher_patch_logits.device))
        probs = torch.zeros_like(teacher_patch_logits, dtype=torch.float32)
        probs[:count] = sinkhorn_knopp(
            teacher_patch_logits[:count], teacher_temp, global_count, n_iterations
        )
        return probs

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: Tensor) -> None:
        """EMA of the mean teacher patch logits over the masked tokens of every rank."""
        batch_sum = teacher_patch_logits.float().sum(dim=0, keepdim=True)
        count = torch.full((), float(teacher_patch_logits.shape[0]), device=batch_sum.device)
        all_reduce_(batch_sum)
        all_reduce_(count)
        # No masked token on any rank: the center stays. Chosen on the device (torch.where),
        # not by reading the count back, which would make the host wait for the GPU every step.
        batch_center = batch_sum / count.clamp(min=1.0)
        updated = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))

    def forward_masked(
        self,
        student_patch_logits: Tensor,
        teacher_probs: Tensor,
        masks_weight: Tensor,
        n_global_crops: int | None = None,
    ) -> Tensor:
        """Per-image mean cross-entropy over that image's masked patches, averaged over images.

        Rows are the masked tokens [M, K]; masks_weight [M] is 1 / (masked tokens of the row's
        image). By default the average is over the images that carry a mask (the weights of one
        image sum to 1). Passing n_global_crops averages over every global crop instead, unmasked
        ones counting zero: DINOv2's normalisation, about mask_probability times smaller.
        """
        rows = masks_weight.shape[0]
        if student_patch_logits.shape[0] < rows or teacher_probs.shape[0] < rows:
            raise ValueError(
                f"{rows} mask weights but {student_patch_logits.shape[0]} student / "
                f"{teacher_probs.shape[0]} teacher patch rows"
            )
        log_probs = F.log_softmax(student_patch_logits[:rows].float() / self.student_temp, dim=-1)
        per_token = -(teacher_probs[:rows] * log_probs).sum(dim=-1)  # [M]
        weighted = (per_token * masks_weight.float()).sum()
        if n_global_crops is not None:
            return weighted / n_global_crops
        n_masked_images = masks_weight.float().sum()
        if rows == 0:
            return weighted  # zero, still attached to the graph
        return weighted / n_masked_images

    def forward(self, *args, **kwargs) -> Tensor:
        return self.forward_masked(*args, **kwargs)
